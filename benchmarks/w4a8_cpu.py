"""Benchmark (CPU, XLA): the W4A8 integer path vs the float-activation paths, K = N = 4096, g128.

Rows per M in (1, 16, 512): dense float32 and bfloat16 matmuls, W4A16 (`quantized_matmul`: dequantize, then a
float dot; f32 and bf16 x) and W4A8 (`quantized_matmul_a8`: int8 x int8 -> int32 per group, dynamic per-token
and static per-tensor activation scales) for int4-asym and fp4_e2m1-asym weights, and W4A8 with integer group
scales (`integer_scales=True`: one int8 GEMM, per-column epilogue). Each figure is the median of --repeats calls of
one jitted function after a warm-up call.

    python -m benchmarks.w4a8_cpu [--size 4096] [--repeats 7] [--out results/bench_w4a8_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import afpq_jax as aq
from afpq_jax.kernels import quantized_matmul, quantized_matmul_a8


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--ms", default="1,16,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    k = n = args.size
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    w32, w16 = jnp.asarray(w), jnp.asarray(w, jnp.bfloat16)
    weights = {f: aq.quantize(w, f, group_size=128, asym=True) for f in ("int4", "fp4_e2m1")}
    integer = {f: aq.quantize(w, f, group_size=128, asym=True, integer_scales=True) for f in ("int4", "fp4_e2m1")}
    rows = []
    for m in (int(v) for v in args.ms.split(",")):
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        # weights are arguments, not closed-over constants: XLA would otherwise fold their dequantization
        dense = jax.jit(lambda x, w: jnp.matmul(x, w, precision="highest" if w.dtype == jnp.float32 else None))
        w4a16 = jax.jit(quantized_matmul)
        w4a8 = jax.jit(quantized_matmul_a8)
        cases = {"dense f32": (dense, (x, w32)), "dense bf16": (dense, (x.astype(jnp.bfloat16), w16))}
        for f, qt in weights.items():
            cases[f"{f} W4A16 f32"] = (w4a16, (x, qt))
            cases[f"{f} W4A16 bf16"] = (w4a16, (x.astype(jnp.bfloat16), qt))
            cases[f"{f} W4A8 dynamic"] = (w4a8, (x, qt))
            cases[f"{f} W4A8 static"] = (w4a8, (x, qt, jnp.float32(0.03)))
            cases[f"{f} W4A8 int-scales dynamic"] = (w4a8, (x, integer[f]))
            cases[f"{f} W4A8 int-scales static"] = (w4a8, (x, integer[f], jnp.float32(0.03)))
        base = None
        for name, (fn, fargs) in cases.items():
            sec = timed(fn, fargs, args.repeats)
            base = base or sec
            row = {"m": m, "k": k, "n": n, "case": name, "ms": round(sec * 1e3, 3),
                   "vs_dense_f32": round(sec / base, 2), "device": jax.devices()[0].device_kind}
            rows.append(row)
            print(f"M={m:4d}  {name:32s} {sec * 1e3:9.3f} ms  ({sec / base:5.2f}x dense f32)", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
