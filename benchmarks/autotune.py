"""Measure tilings of one `quantized_matmul` implementation on this device and record the fastest per shape.

For every format, scheme and M it starts from the implementation's current tiling, then tries the values of one
`BlockConfig` field at a time (coordinate descent, the other fields at their best so far). Each candidate is
checked against "xla" and timed with the benchmark's device-side loop over a rotation of distinct weights that
L2 cannot hold (`benchmarks.quantized_matmul.measure`, e2e). A candidate replaces the best when it is at least 3%
faster. The winners go into the tuning table
(`afpq_jax.kernels.tuning`: ``$AFPQ_TUNED_CONFIGS`` or the packaged file, or ``--out``), which dispatch then
uses for these shapes on this device kind; each shape is recorded as soon as it is measured, so a run stopped
early keeps what it finished. It prints one markdown row per shape: default and tuned time, and the tuned fields.

    python -m benchmarks.autotune --impl triton --formats nf4 int4 --m 1 16 128   # on a GPU
    python -m benchmarks.autotune --impl xla_scan --m 1 --k 1024 --n 512 --out /tmp/t.json  # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import afpq_jax
from afpq_jax.kernels import IMPLEMENTATIONS, BlockConfig, Problem, quantized_matmul, resolve, tuning

from benchmarks.quantized_matmul import measure, weight_rotation  # the benchmark's timing, shared

# The fields worth searching per implementation, in search order, with the values tried.
CANDIDATES: dict[str, dict[str, tuple]] = {
    "triton": {"block_m": (1, 2, 4, 16), "block_n": (32, 64, 128, 256), "block_k": (128, 256, 512, 1024),
               "split_k": (1, 2, 4, 8, 16), "split_k_atomic": (False, True), "num_warps": (2, 4, 8),
               "num_stages": (2, 3, 4), "lookup": (True, False)},
    "mosaic_tpu": {"block_n": (128, 256, 512, 1024, 2048), "block_k": (512, 1024, 2048, 4096, 8192),
                   "x_resident": (True, False), "lookup": (False, True)},
    "mosaic_gpu": {"block_n": (64, 128, 256), "num_stages": (2, 3, 4)},
    "xla_scan": {"block_k": (128, 256, 512, 1024, 2048, 4096)},
}
MIN_GAIN = 0.03


def search(impl: str, xs, qts, *, reps: int, loops: int) -> tuple[BlockConfig, float, float]:
    """(best config, its seconds per matmul, the default's seconds per matmul) over the rotation
    ``zip(xs, qts)`` (same shapes; the first pair is checked against "xla")."""
    x, qt = xs[0], qts[0]
    prob = Problem.create(x.shape, x.dtype, qt)
    ref = np.asarray(quantized_matmul(x, qt, implementation="xla"), np.float32)
    tol = 1e-5 if x.dtype == jnp.float32 else 2e-2

    def time_config(cfg: BlockConfig) -> float | None:
        if IMPLEMENTATIONS[impl].supports(prob, resolved(cfg)) is not None:
            return None
        op = functools.partial(quantized_matmul, implementation=impl, config=cfg)
        try:
            y = np.asarray(jax.jit(op)(x, qt), np.float32)
            if np.max(np.abs(y - ref)) > tol * (np.max(np.abs(ref)) + 1e-30):
                print(f"  {cfg}: wrong result, skipped", flush=True)
                return None
            return measure(op, xs, qts, reps=reps, loops=loops, profile=False).e2e
        except Exception as e:  # a tiling that fails to compile is not a candidate
            print(f"  {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)
            return None

    def resolved(cfg: BlockConfig | None) -> BlockConfig:
        return resolve(impl, prob, cfg)  # defaults only: an earlier table entry is not the baseline

    best = resolved(None)
    default_t = best_t = time_config(best)
    if best_t is None:
        raise SystemExit(f"{impl} declines or fails its default tiling for this shape")
    for field, values in CANDIDATES.get(impl, {}).items():
        for v in values:
            if getattr(best, field) == v or (field == "block_m" and v < 16 and (prob.m > 4 or v < prob.m)):
                continue  # the GEMV variant (block_m < 16) only for M <= 4, with a tile of at least M rows
            cand = dataclasses.replace(best, **{field: v})
            t = time_config(cand)
            if t is not None and t < best_t * (1 - MIN_GAIN):
                best, best_t = cand, t
    return best, best_t, default_t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", required=True, choices=sorted(CANDIDATES))
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--formats", nargs="+", default=["nf4", "int4"])
    ap.add_argument("--schemes", nargs="+", choices=["asym", "sym"], default=["asym"])
    ap.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    ap.add_argument("--x-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--loops", type=int, default=None, help="rounds per timed call (default: 10 on a device, 1 "
                                                            "on CPU)")
    ap.add_argument("--out", type=Path, default=None, help="table to update (default: the one dispatch reads)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new shapes after this long")
    a = ap.parse_args()
    kind = jax.devices()[0].device_kind
    loops = a.loops or (10 if jax.default_backend() != "cpu" else 1)
    g = None if a.group_size == 0 else a.group_size
    on_device = jax.default_backend() != "cpu"
    recorded, path, start = 0, None, time.perf_counter()
    print(f"device: {kind}; {a.impl}; K={a.k} N={a.n} g={g or 'channel'} x={a.x_dtype}\n")
    print("| shape | M | default µs | tuned µs | speedup | tuned fields |\n|---|---|---|---|---|---|", flush=True)
    for fmt in a.formats:
        for scheme in a.schemes:
            asym = scheme == "asym"
            r = weight_rotation(fmt, g, asym, a.k, a.n) if on_device else 1
            qts = [afpq_jax.quantize(jax.random.normal(key, (a.k, a.n), jnp.float32), fmt, group_size=g, asym=asym)
                   for key in jax.random.split(jax.random.key(0), r)]
            for m in a.m:
                if a.budget_s is not None and time.perf_counter() - start > a.budget_s:
                    print(f"| {fmt}-{scheme} | {m} | skipped: --budget-s reached | | | |", flush=True)
                    continue
                xs = [jax.random.normal(key, (m, a.k), jnp.float32).astype(a.x_dtype)
                      for key in jax.random.split(jax.random.key(1), r)]
                cfg, t, t0 = search(a.impl, xs, qts, reps=a.reps, loops=loops)
                prob = Problem.create(xs[0].shape, xs[0].dtype, qts[0])
                path = tuning.record({tuning.shape_key(a.impl, prob, kind): cfg}, a.out)  # kept if the run stops early
                recorded += 1
                fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
                print(f"| {fmt}-{scheme}-g{g or 'ch'} | {m} | {t0 * 1e6:.1f} | {t * 1e6:.1f} | {t0 / t:.2f}x | "
                      f"{fields} |", flush=True)
    print(f"\nrecorded {recorded} tiling(s)" + (f" in {path}" if path else ""))


if __name__ == "__main__":
    main()
