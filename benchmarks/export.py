"""Benchmark: export and import of SmolLM2-135M (the demo model) in each outside format.

For each (scheme, format) row: RTN-quantize SmolLM2 in memory, `afpq_jax.export` it (timed), measure the
directory's size, `afpq_jax.load` it back (timed), and check the logits of one 64-token window equal the
in-memory model's bit for bit. Rows: the demo's NF3-asym g128 (only the afpq layout holds it), INT4-sym g64
(GPTQ v1, compressed-tensors; g64 because SmolLM2's 576 inputs are 4.5 groups of 128 and GPTQ's loaders need whole
groups), INT4-asym g64 (gptq_v2, compressed-tensors), NVFP4 (compressed-tensors) and NVFP4 + AFPQ (afpq layout).

    python -m benchmarks.export [--out-dir /tmp/afpq-export-bench] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import afpq_jax as aq
from afpq_jax import assets
from benchmarks.experiment import commit

ROWS = [
    ("nf3-asym-g128 (demo)", lambda: aq.QuantScheme.create("nf3", group_size=128, asym=True), ("afpq",)),
    ("int4-sym-g64", lambda: aq.QuantScheme.create("int4", group_size=64, asym=False),
     ("gptq", "compressed-tensors", "afpq")),
    ("int4-asym-g64", lambda: aq.QuantScheme.create("int4", group_size=64, asym=True),
     ("gptq", "compressed-tensors")),
    ("nvfp4", lambda: aq.QuantScheme.preset("nvfp4"), ("compressed-tensors",)),
    ("nvfp4-afpq", lambda: aq.QuantScheme.preset("nvfp4", asym=True), ("afpq",)),
]


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=None, help="where the exports go (default: a temporary directory)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="afpq-export-bench-"))
    model_dir = assets.smollm2_hf_dir()
    ids = jnp.asarray(np.arange(64).reshape(1, 64) * 37 % 49152)
    results = []
    for label, make, targets in ROWS:
        model = aq.quantize_pretrained(model_dir, make(), progress=False)
        ref = np.asarray(model(ids))
        for target in targets:
            out = root / f"{label.split()[0]}-{target}"
            t0 = time.perf_counter()
            aq.export(model, out, format=target, overwrite=True)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = aq.load(out)
            load_s = time.perf_counter() - t0
            same = bool(np.array_equal(np.asarray(back(ids)), ref))
            results.append({"scheme": label, "format": target, "export_seconds": round(export_s, 2),
                            "import_seconds": round(load_s, 2), "safetensors_mb": round(_size(out) / 1e6, 1),
                            "dtype": json.loads((out / "config.json").read_text())["torch_dtype"],
                            "identical_logits": same, "commit": commit()})
            print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(out)
    if args.markdown:
        print("\n| scheme | format | export s | import s | safetensors MB | float dtype | same logits |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['scheme']} | {r['format']} | {r['export_seconds']} | {r['import_seconds']} | "
                  f"{r['safetensors_mb']} | {r['dtype']} | {'yes' if r['identical_logits'] else 'NO'} |")


if __name__ == "__main__":
    main()
