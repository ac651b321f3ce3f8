#!/usr/bin/env python
"""afpq-jax's compressed-tensors layers for the library to read back (the other half of
scripts/make_compressed_tensors_fixtures.py, which decompresses them with compressed-tensors itself).

Writes ``tests/fixtures/compressed_tensors/ours/<case>.safetensors`` (our encoder's tensors for a seeded random
weight) and ``ours/cases.json`` (each case's format and ``weights`` args, as our export writes them). Run in the
project's .venv before the torch script:

    .venv/bin/python scripts/export_compressed_tensors_layers.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "compressed_tensors" / "ours"
K, N = 128, 40  # in, out


def cases():
    """name -> the QuantizedTensor our export would write (deterministic: seeded weights, RTN)."""
    import afpq_jax as aq
    out = {}
    specs = {"int4_asym_g32": ("int4", 32, True), "int4_sym_g128": ("int4", 128, False),
             "int3_asym_g64": ("int3", 64, True), "int8_sym_channel": ("int8", None, False),
             "int2_asym_g16": ("int2", 16, True)}
    for i, (name, (fmt, group, asym)) in enumerate(specs.items()):
        w = np.random.default_rng(i).standard_normal((K, N)).astype(np.float32) * 0.05
        out[name] = aq.quantize(w, fmt, group_size=group, asym=asym)
    for i, preset in enumerate(("nvfp4", "mxfp4")):
        w = np.random.default_rng(100 + i).standard_normal((K, N)).astype(np.float32) * 0.05
        out[preset] = aq.QuantScheme.preset(preset, asym=False).quantize(w)
    return out


def main() -> None:
    from afpq_jax._src.interop import compressed_tensors as ct
    from afpq_jax._src.io.safetensors_io import write_file
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, qt in cases().items():
        write_file(OUT / f"{name}.safetensors", ct.encode_layer(qt))
        meta[name] = {"format": ct.layer_format(qt), "weights": ct.weights_scheme(qt)}
        print(name, meta[name]["format"])
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
