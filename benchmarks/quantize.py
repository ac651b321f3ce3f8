"""Benchmark: quantize + pack a 4096x4096 float32 matrix, group 128, for every format, vs plain INT4 RTN.

The baseline is the textbook `jnp.round` INT4 asym min/max RTN of the same matrix with the same nibble packing,
jit-compiled. Each figure is the median of --repeats runs after one warm-up (compile) run.

    python -m benchmarks.quantize [--size 4096] [--group-size 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import afpq_jax as aq


@jax.jit
def plain_int4_rtn(w):
    k, n = w.shape
    wg = w.reshape(k // 128, 128, n)
    lo = jnp.minimum(wg.min(axis=1, keepdims=True), 0)
    hi = jnp.maximum(wg.max(axis=1, keepdims=True), 0)
    scale = jnp.where(hi > lo, (hi - lo) / 15, 1.0)
    zero = jnp.round(-lo / scale)
    q = jnp.clip(jnp.round(wg / scale) + zero, 0, 15).astype(jnp.uint8).reshape(k // 2, 2, n)
    return q[:, 0] | (q[:, 1] << 4), scale.astype(jnp.float16), zero.astype(jnp.uint8)


def timed(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    w = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
    quant = jax.jit(aq.quantize, static_argnames=("fmt", "group_size", "asym"))
    base = timed(lambda: plain_int4_rtn(w), args.repeats)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.size}x{args.size} float32, "
          f"group {args.group_size}, median of {args.repeats}")
    print(f"{'format':<10} {'scheme':<5} {'seconds':>8} {'x INT4 RTN':>11}")
    print(f"{'baseline':<10} {'asym':<5} {base:8.4f} {1.0:11.2f}")
    for name in aq.formats.available_formats():
        for asym in (True, False):
            t = timed(lambda: quant(w, name, group_size=args.group_size, asym=asym), args.repeats)
            print(f"{name:<10} {'asym' if asym else 'sym':<5} {t:8.4f} {t / base:11.2f}")


if __name__ == "__main__":
    main()
