"""The C++ CPU kernel of `quantized_matmul` per vector ISA, against this machine's dense float32 matmul in the
same run (public API only).

For each ``--arch`` (an ``-march`` value, or ``native``) a subprocess builds the kernel with
``AFPQ_CPU_KERNEL_ARCH`` and times, for every format and M, the kernel and the dense float32 ``x @ W`` of the
same shape, alternating one call of each ``--reps`` times (each a jitted call, ``block_until_ready``), and keeps
each one's minimum: on a shared or noisy machine the two minima come from the same stretch of time, so their
ratio holds where medians of separate runs swing by 2-3x. ``--xla`` adds the "xla" path (dequantize, then one
dot), for dispatch's size rule.

    python -m benchmarks.cpu_kernel --arch native x86-64-v3 x86-64-v2 --m 1 16   # AVX-512 / AVX2 / portable
    python -m benchmarks.cpu_kernel --arch x86-64-v3 --m 32 64 128 256 --xla --formats int4 nf4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FORMATS = ["int4", "fp4_e2m1", "nf4", "nf3"]


def _min_times(fns, reps: int) -> list[float]:
    """Each function's minimum over ``reps`` rounds of one call each, in turn (after one warm-up call each)."""
    import jax
    for fn in fns:
        jax.block_until_ready(fn())
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def run_one(args) -> None:
    """In the subprocess: one JSON line per (format, M)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import afpq_jax
    from afpq_jax.kernels import cpu_kernel_isa, quantized_matmul

    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.k, args.n), np.float32)
    wd = jnp.asarray(w)
    dense = jax.jit(lambda a, b: a @ b)
    kernel = jax.jit(lambda a, q: quantized_matmul(a, q, implementation="cpu"))
    xla = jax.jit(lambda a, q: quantized_matmul(a, q, implementation="xla"))
    for fmt in args.formats:
        qt = afpq_jax.quantize(w, fmt, group_size=args.group_size, asym=not args.sym)
        for m in args.m:
            x = jnp.asarray(rng.standard_normal((m, args.k), np.float32))
            fns = [lambda: kernel(x, qt), lambda: dense(x, wd)] + ([lambda: xla(x, qt)] if args.xla else [])
            times = _min_times(fns, args.reps)
            print(json.dumps({"isa": cpu_kernel_isa(), "format": fmt, "m": m, "cpu_ms": times[0] * 1e3,
                              "dense_ms": times[1] * 1e3, "xla_ms": times[2] * 1e3 if args.xla else None}),
                  flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["native"], help="-march values (AFPQ_CPU_KERNEL_ARCH)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true", help="symmetric scales (default: asymmetric, AFPQ)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--xla", action="store_true", help="also time the 'xla' path (dequantize, one dot)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_one(a)
    cols = ["ISA (-march)", "format", "M", "kernel ms", "dense f32 ms", "kernel / dense"]
    if a.xla:
        cols += ["xla ms", "kernel / xla"]
    print(f"K = {a.k}, N = {a.n}, g{a.group_size}, {'sym' if a.sym else 'asym'}, float32 x; minimum of {a.reps} "
          "alternating calls each")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in (("k", a.k), ("n", a.n), ("group_size", a.group_size),
                                                             ("reps", a.reps))]
    forwarded += ["--m", *map(str, a.m), "--formats", *a.formats] + (["--sym"] if a.sym else [])
    forwarded += ["--xla"] if a.xla else []
    for arch in a.arch:
        env = {**os.environ, "AFPQ_CPU_KERNEL_ARCH": arch}
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_kernel", "--worker", *forwarded], env=env,
                                stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            r = json.loads(line)
            row = [f"{r['isa']} ({arch})", r["format"], r["m"], f"{r['cpu_ms']:.3f}", f"{r['dense_ms']:.3f}",
                   f"{r['cpu_ms'] / r['dense_ms']:.2f}x"]
            if a.xla:
                row += [f"{r['xla_ms']:.3f}", f"{r['cpu_ms'] / r['xla_ms']:.2f}x"]
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
        if proc.wait() != 0:
            sys.exit(f"the {arch} run failed (exit {proc.returncode})")


if __name__ == "__main__":
    main()
