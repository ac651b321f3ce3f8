#!/usr/bin/env python
"""Layers compressed by compressed-tensors itself, for `tests/interop/test_compressed_tensors.py`.

For each case a random torch weight (out, in) gets its quantization parameters from the library
(`calculate_qparams`; NVFP4's global scale from `generate_gparam`), is compressed by the library's own compressor
(`PackedQuantizationCompressor`, `NVFP4PackedCompressor`, `MXFP4PackedCompressor`: what llm-compressor writes and
vLLM reads) and decompressed again by the same compressor. Written to
``tests/fixtures/compressed_tensors/<case>.safetensors``: the compressed tensors under their checkpoint names
(``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``, ``weight_global_scale``) and
``reference`` (the library's decompressed weight, float32), plus ``cases.json`` (each case's ``weights``
quantization args and format, as a config group holds them). afpq-jax's reader must give ``reference`` from the
compressed tensors alone. The other direction: the layers our encoder wrote into ``ours/``
(scripts/export_compressed_tensors_layers.py, run first in the project's .venv) are decompressed by the library
into ``ours/<case>.reference.safetensors``.

How to run (torch must NOT go into the project's .venv; see tests/fixtures/README.md)::

    /work/torchvenv/bin/pip install torch==2.13.0 compressed-tensors==0.20.1 safetensors numpy
    /work/torchvenv/bin/python scripts/make_compressed_tensors_fixtures.py

Made with torch 2.13.0+cpu and compressed-tensors 0.20.1; deterministic (fixed seeds, one thread).
"""

from __future__ import annotations

import json
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from safetensors.torch import load_file, save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "compressed_tensors"
N, K = 40, 128  # out, in: small, whole groups for every group size below

INT_CASES = {  # name: (num_bits, symmetric, strategy, group_size)
    "int4_asym_g32": (4, False, "group", 32),
    "int4_sym_g32": (4, True, "group", 32),
    "int3_asym_g64": (3, False, "group", 64),  # dense 3-bit packing (compressed-tensors >= 0.18)
    "int2_asym_g16": (2, False, "group", 16),
    "int8_sym_channel": (8, True, "channel", None),
    "int4_asym_channel": (4, False, "channel", None),
}


def _minmax(w: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    g = w.shape[1] if group is None else group
    grouped = w.reshape(w.shape[0], -1, g)
    return grouped.amin(-1), grouped.amax(-1)


def _case(name: str, seed: int, args: QuantizationArgs, compressor, fmt: str) -> dict:
    torch.manual_seed(seed)
    w = torch.randn(N, K) * 0.05
    w[0, :8] *= 12.0  # an outlier row: unequal group ranges
    lo, hi = _minmax(w, args.group_size)
    state = {"weight": w}
    global_scale = None
    if fmt == "nvfp4-pack-quantized":
        global_scale = generate_gparam(w.amin(), w.amax())
        state["weight_global_scale"] = global_scale
    scale, zp = calculate_qparams(lo, hi, args, global_scale=global_scale)
    state["weight_scale"] = scale
    if not args.symmetric:
        state["weight_zero_point"] = zp
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressed = compressor.compress(state, scheme)
    reference = compressor.decompress(dict(compressed), scheme)["weight"].to(torch.float32)
    tensors = {k: v.contiguous() for k, v in compressed.items()}
    tensors["reference"] = reference.contiguous()
    save_file(tensors, str(OUT / f"{name}.safetensors"))
    print(f"{name}: {', '.join(f'{k} {tuple(v.shape)} {v.dtype}' for k, v in sorted(tensors.items()))}")
    return {"format": fmt, "weights": json.loads(args.model_dump_json())}


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, compressed-tensors {compressed_tensors.__version__}")
    cases = {}
    for i, (name, (bits, sym, strategy, group)) in enumerate(INT_CASES.items()):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy, group_size=group)
        cases[name] = _case(name, i, args, PackedQuantizationCompressor, "pack-quantized")
    for i, (name, preset, compressor, fmt) in enumerate([
            ("nvfp4", "NVFP4A16", NVFP4PackedCompressor, "nvfp4-pack-quantized"),
            ("mxfp4", "MXFP4A16", MXFP4PackedCompressor, "mxfp4-pack-quantized")]):
        args = QuantizationArgs(**PRESET_SCHEMES[preset]["weights"].model_dump())
        cases[name] = _case(name, 100 + i, args, compressor, fmt)
    meta = {"torch": torch.__version__, "compressed_tensors": compressed_tensors.__version__, "cases": cases}
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    read_ours()


def read_ours() -> None:
    """Our encoder's layers (``ours/``, from scripts/export_compressed_tensors_layers.py) decompressed by the
    library: ``ours/<case>.reference.safetensors`` holds its weight (float32)."""
    ours = OUT / "ours"
    if not (ours / "cases.json").exists():
        print("no ours/cases.json: run scripts/export_compressed_tensors_layers.py in the project's .venv first")
        return
    compressors = {"pack-quantized": PackedQuantizationCompressor, "nvfp4-pack-quantized": NVFP4PackedCompressor,
                   "mxfp4-pack-quantized": MXFP4PackedCompressor}
    for name, case in json.loads((ours / "cases.json").read_text()).items():
        tensors = load_file(str(ours / f"{name}.safetensors"))
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**case["weights"]))
        weight = compressors[case["format"]].decompress(dict(tensors), scheme)["weight"].to(torch.float32)
        save_file({"reference": weight.contiguous()}, str(ours / f"{name}.reference.safetensors"))
        print(f"ours/{name}: decompressed by the library {tuple(weight.shape)}")


if __name__ == "__main__":
    main()
