#!/usr/bin/env python
"""afpq-jax's compressed-tensors layers for the library to read back (the other half of
scripts/make_compressed_tensors_fixtures.py, which decompresses them with compressed-tensors itself).

Per case, the tiny ``llama_gqa`` fixture is quantized (`afpq_jax.quantize_pretrained`, RTN) and exported
(`afpq_jax.export`, format compressed-tensors); one layer of the export, ``model.layers.0.mlp.down_proj``
(K = 160, N = 64), is kept: ``tests/fixtures/compressed_tensors/ours/<case>.safetensors`` holds its tensors
byte for byte, ``ours/cases.json`` its format and ``weights`` args from the export's config.json. Run in the
project's .venv before the torch script:

    .venv/bin/python scripts/export_compressed_tensors_layers.py
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "tests" / "fixtures" / "compressed_tensors" / "ours"
LAYER = "model.layers.0.mlp.down_proj."


def schemes():
    import afpq_jax as aq
    create = aq.QuantScheme.create
    return {"int4_asym_g32": create("int4", group_size=32), "int4_sym_g32": create("int4", group_size=32, asym=False),
            "int3_asym_g32": create("int3", group_size=32), "int8_sym_channel": create("int8", group_size=None,
                                                                                           asym=False),
            "int2_asym_g16": create("int2", group_size=16), "nvfp4": aq.QuantScheme.preset("nvfp4"),
            "mxfp4": aq.QuantScheme.preset("mxfp4")}


def keep_layer(src: Path, dst: Path, prefix: str) -> list[str]:
    """The tensors of ``src`` (a safetensors file) whose names start with ``prefix``, copied byte for byte into
    ``dst`` under their names without it (safetensors: u64 header length, JSON header, data)."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out_header, chunks, offset = {}, [], 0
    for name, info in sorted(header.items()):
        if not name.startswith(prefix):
            continue
        begin, end = info["data_offsets"]
        out_header[name[len(prefix):]] = {**info, "data_offsets": [offset, offset + end - begin]}
        chunks.append(data[begin:end])
        offset += end - begin
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    return sorted(out_header)


def main() -> None:
    import afpq_jax as aq
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, scheme in schemes().items():
        model = aq.quantize_pretrained(ROOT / "tests" / "fixtures" / "llama_gqa", [aq.QuantRule(r".*", scheme)],
                                       progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            aq.export(model, Path(tmp) / "out", format="compressed-tensors")
            config = json.loads((Path(tmp) / "out" / "config.json").read_text())["quantization_config"]
            tensors = keep_layer(Path(tmp) / "out" / "model.safetensors", OUT / f"{name}.safetensors", LAYER)
        group = next(iter(config["config_groups"].values()))
        meta[name] = {"format": group.get("format") or config["format"], "weights": group["weights"]}
        print(name, meta[name]["format"], tensors)
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
