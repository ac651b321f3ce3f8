"""Benchmark `afpq_jax.kernels.quantized_matmul` against dense matmuls of the same shape.

For every format, M and implementation available on the default backend ("xla" everywhere; "cpu" and "xla_scan"
on CPU; "mosaic_tpu" on TPU; "triton" and "mosaic_gpu" on GPU, where they accept the shape) it prints the median time of --reps runs after
a warm-up (compile) run, the time of a dense float32 and bfloat16 ``x @ W`` of the same shape, and on a
TPU/GPU the achieved bandwidth (ideal bytes: packed weight + x + output, see `roofline.ideal_bytes`) and its
fraction of the device's HBM roofline (bandwidth table keyed by device_kind in `roofline.HBM_BANDWIDTH`).
Every kernel's output is checked against "xla" first.

    python -m benchmarks.quantized_matmul --x-dtype float32 --loops 4   # CPU: C++ kernel, scan, xla; M=1, 16
    python -m benchmarks.quantized_matmul --m 1 16 128 --formats nf4 nf3 int4 --markdown   # on a device
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import afpq_jax
from afpq_jax.kernels import (IMPLEMENTATIONS, BlockConfig, Problem, current_backend, quantized_matmul,
                              resolve, roofline, select_implementation)


def timed(fn, xs, ws, *, reps: int, loops: int, r: int) -> float:
    """Seconds per matmul: the median time of ``fn(xs, ws, 2 * loops)`` minus that of ``fn(xs, ws, loops)``
    (after a warm-up), over the ``loops * r`` matmuls between them. The difference drops every fixed cost of a
    call: host dispatch, and the copies of the weights into the loop carry."""
    def median(n):
        jax.block_until_ready(fn(xs, ws, n))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(xs, ws, n))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return max(median(2 * loops) - median(loops), 1e-12) / (loops * r)


# Where a profiler trace keeps the op timeline: GPU stream lines, TPU's "XLA Ops" line, the CPU client's thunks.
def _timeline_lines(plane):
    for line in plane.lines:
        if plane.name.startswith("/device:GPU") and line.name.startswith("Stream"):
            yield line
        elif plane.name.startswith("/device:TPU") and line.name == "XLA Ops":
            yield line
        elif plane.name == "/host:CPU" and line.name.startswith("tf_XLAPjRtCpuClient"):
            yield line


_KERNEL_MARKERS = ("afpq_qmm", "custom-call", "custom_call", "ffi_call", "triton", "mosaic")


def profiled(fn, args, calls: int = 10) -> tuple[float, float] | None:
    """(kernel, XLA-side) seconds per call of ``fn(*args)`` from a profiler trace of ``calls`` calls: the summed
    durations of the timeline's ops (summed over threads and streams, so not wall time). "kernel" = ops whose
    name or HLO op names a custom call, a Pallas kernel ("afpq_qmm", "mosaic", "triton") or an FFI call: our
    kernels, and for "xla" a library GEMM or XLA's own Triton GEMM fusion (with any dequantization fused into
    it). "XLA-side" = everything else (x permutation, split-K sum, dequantization, casts). Host dispatch and
    idle gaps are in neither. None when the trace has no op timeline or the profiler fails."""
    import glob
    import tempfile

    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    try:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                for _ in range(calls):
                    out = fn(*args)
                jax.block_until_ready(out)
            files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
            if not files:
                return None
            data = ProfileData.from_file(files[0])
    except Exception as e:  # a profiler problem must not turn a working kernel's row into a failure
        print(f"profiler trace failed ({type(e).__name__}: {e}); kernel / XLA-side split: n/a", flush=True)
        return None
    kernel = other = 0.0
    seen = False
    for plane in data.planes:
        for line in _timeline_lines(plane):
            for ev in line.events:
                if ev.name.startswith(("end: ", "ThreadpoolListener")) or ev.duration_ns <= 0:
                    continue
                seen = True
                hlo = dict(ev.stats).get("hlo_op", "")
                if any(k in ev.name.lower() or k in str(hlo).lower() for k in _KERNEL_MARKERS):
                    kernel += ev.duration_ns
                else:
                    other += ev.duration_ns
    return (kernel * 1e-9 / calls, other * 1e-9 / calls) if seen else None


def implementation_variants(impls, triton_lookup: str) -> list[tuple[str, BlockConfig | None]]:
    """(row label, config) per timed variant: "triton" is the default config (table lookup), "triton-tree" is
    Triton with BlockConfig(lookup=False); ``triton_lookup`` is "on", "off" or "both"."""
    variants = []
    for name in impls:
        if name != "triton":
            variants.append((name, None))
            continue
        if triton_lookup in ("on", "both"):
            variants.append((name, None))
        if triton_lookup in ("off", "both"):
            variants.append(("triton-tree", BlockConfig(lookup=False)))
    return variants


def looped(op):
    """One executable running ``n`` (an argument) rounds over every pair ``op(x_i, w_i)``. x and the weight's
    first array carry one element written from the previous output, so XLA can neither hoist a matmul (or the
    "xla" path's dequantization) out of the loop nor drop one; the writes are in place (one element of the loop
    carry). Host dispatch was ~500 µs per call with 16 pytree weights on an H200 machine, more than the matmuls
    took: `timed` takes it out."""
    def touch(a, c):
        idx = (0,) * a.ndim
        return a.at[idx].set(a[idx] + (c > 1).astype(a.dtype))  # c stays < 1e-3: values unchanged

    def run(xs, ws, n):
        def body(_, carry):
            xs, ws, c = carry
            new_x, new_w = [], []
            for x, w in zip(xs, ws):
                x = touch(x, c)
                leaves, tree = jax.tree.flatten(w)
                w = jax.tree.unflatten(tree, [touch(leaves[0], c)] + leaves[1:])
                y = op(x, w)
                c = jnp.tanh(y[(0,) * y.ndim].astype(jnp.float32)) * 1e-3
                new_x.append(x)
                new_w.append(w)
            return new_x, new_w, c
        return jax.lax.fori_loop(0, n, body, (list(xs), list(ws), jnp.float32(0)))[2]
    return jax.jit(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--formats", nargs="+", default=["fp4_e2m1", "int4"])
    ap.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    ap.add_argument("--sym", action="store_true", help="symmetric instead of asymmetric (AFPQ) scales")
    ap.add_argument("--schemes", nargs="+", choices=["asym", "sym"], default=None,
                    help="time these schemes (default: asym, or sym with --sym); both -> an asym-over-sym table")
    ap.add_argument("--x-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--impls", nargs="+", default=None, help="default: every registered one that applies")
    ap.add_argument("--triton-lookup", choices=["on", "off", "both"], default="on",
                    help="Triton codebook decode: table lookup (on, the default config), select tree (off), or "
                         "both as two rows ('triton' and 'triton-tree')")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the profiler trace that splits each op's device time into kernel and XLA-side ops")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--loops", type=int, default=None,
                    help="rounds over the R weights in the shorter of the two timed calls (default: 10 on an accelerator, "
                         "1 on CPU)")
    ap.add_argument("--stack", type=int, default=None,
                    help="distinct weights per timed call (one executable runs all R matmuls; R weights also defeat "
                         "the L2 cache). Default: 16 on an accelerator, 1 on CPU")
    ap.add_argument("--markdown", action="store_true", help="markdown rows, printed as each case finishes")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new (format, M) case after this many seconds; the rest are listed as skipped")
    a = ap.parse_args()

    backend = current_backend()
    dev = jax.devices()[0]
    bw = roofline.hbm_bandwidth(dev.device_kind) if backend != "cpu" else None
    print(f"device: {dev.device_kind} ({backend}), jax {jax.__version__}, HBM "
          f"{'%.0f GB/s' % (bw / 1e9) if bw else 'n/a'}; median of {a.reps} runs after warm-up; K={a.k} N={a.n}")
    g = None if a.group_size == 0 else a.group_size
    xdt = jnp.dtype(a.x_dtype)
    impls = a.impls or [n for n in IMPLEMENTATIONS if n == "xla" or IMPLEMENTATIONS[n].backend == backend]

    variants = implementation_variants(impls, a.triton_lookup)

    r = a.stack or (8 if backend != "cpu" else 1)
    loops = a.loops or (10 if backend != "cpu" else 1)
    print(f"time per matmul = (call of {2 * loops} rounds - call of {loops} rounds (--loops)) / ({loops} x {r}), "
          f"each round over {r} distinct weights (--stack) in one jitted loop")
    kw, kx = jax.random.split(jax.random.key(0))
    ws = [jax.random.normal(k, (a.k, a.n), jnp.float32) for k in jax.random.split(kw, r)]
    dense = looped(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    ws16 = [w.astype(jnp.bfloat16) for w in ws]
    header = ["format", "M", "impl", "time µs", "kernel / XLA-side µs", "vs dense f32", "vs dense bf16", "TFLOP/s"]
    if bw:
        header += ["GB/s", "of roofline", "bound vs bf16"]
    schemes = a.schemes or (["sym"] if a.sym else ["asym"])
    rows, failures, times, dense_times, dispatched = [], [], {}, {}, {}
    start = time.perf_counter()

    def emit(row):
        rows.append(row)
        if a.markdown:
            print("| " + " | ".join(str(c) for c in row) + " |", flush=True)

    if a.markdown:
        print("| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|", flush=True)
    for fmt, scheme in [(f, s) for f in a.formats for s in schemes]:
        asym = scheme == "asym"
        qts = [afpq_jax.quantize(w, fmt, group_size=g, asym=asym) for w in ws]
        qt = qts[0]
        for m in a.m:
            if a.budget_s is not None and time.perf_counter() - start > a.budget_s:
                emit([f"{fmt}-{scheme}", m, "", "skipped: --budget-s reached"] + [""] * (len(header) - 4))
                continue
            xs = [jax.random.normal(k, (m, a.k), jnp.float32) for k in jax.random.split(kx, r)]
            fresh = m not in dense_times
            if fresh:  # the same dense matmuls for every format: timed once per M
                dense_times[m] = (timed(dense, xs, ws, reps=a.reps, loops=loops, r=r),
                                  timed(dense, [x.astype(jnp.bfloat16) for x in xs], ws16, reps=a.reps, loops=loops, r=r))
            t32, t16 = dense_times[m]
            xq = xs[0].astype(xdt)
            xqs = [x.astype(xdt) for x in xs]
            prob = Problem.create(xq.shape, xq.dtype, qt)
            dispatched[fmt, scheme, m] = select_implementation(prob, log=False)[0]
            ref = None
            for name, config in variants:
                impl = name.removesuffix("-tree")
                cfg = resolve(impl, prob, config)
                why = IMPLEMENTATIONS[impl].supports(prob, cfg)
                if why is not None:
                    emit([f"{fmt}", m, name, f"declined: {why}"] + [""] * (len(header) - 4))
                    continue
                op = functools.partial(quantized_matmul, implementation=impl, config=config)
                f = looped(op)
                try:
                    y = np.asarray(jax.jit(op)(xq, qt), np.float32)
                    if ref is None:
                        ref = np.asarray(quantized_matmul(xq, qt, implementation="xla"), np.float32)
                    err = float(np.max(np.abs(y - ref)) / (np.max(np.abs(ref)) + 1e-30))
                    if err > (1e-5 if xdt == jnp.float32 else 2e-2):
                        failures.append(f"{name} {fmt} M={m}: relative error {err:.2e} vs xla")
                        emit([f"{fmt}", m, name, f"WRONG: relative error {err:.2e} vs xla"]
                             + [""] * (len(header) - 4))
                        continue
                    t = timed(f, xqs, qts, reps=a.reps, loops=loops, r=r)
                    parts = profiled(jax.jit(op), (xq, qt)) if a.profile else None
                except Exception as e:  # a kernel that fails to compile or run is a finding, not the end of the run
                    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                    failures.append(f"{name} {fmt} M={m}: {type(e).__name__}: {msg}")
                    emit([f"{fmt}", m, name, f"FAILED: {type(e).__name__}: {msg}"]
                         + [""] * (len(header) - 4))
                    continue
                times[fmt, scheme, m, name] = t
                split = "n/a" if parts is None else f"{parts[0] * 1e6:.1f} / {parts[1] * 1e6:.1f}"
                row = [f"{fmt}-{scheme}-g{g or 'ch'}", m, name, f"{t * 1e6:.1f}", split,
                       f"{t / t32:.2f}x", f"{t / t16:.2f}x", f"{2 * m * a.k * a.n / t / 1e12:.2f}"]
                if bw:
                    ideal = roofline.ideal_bytes(prob)
                    gbs = ideal / t / 1e9
                    row += [f"{gbs:.0f}", f"{gbs * 1e9 / bw:.1%}",
                            f"{roofline.decode_bound(fmt, g, asym, m, a.k, a.n, xdt.itemsize):.2f}x"]
                emit(row)
            if fresh:
                emit(["dense", m, "f32 / bf16", f"{t32 * 1e6:.1f} / {t16 * 1e6:.1f}", "", "", ""]
                     + [""] * (len(header) - 7))
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    if not a.markdown:
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    print("ratios: time of the quantized op / time of the dense matmul (< 1 = faster). Times are end to end: "
          "the op as a user calls it (x permutation, kernel, split-K sum), per matmul.\n"
          "kernel / XLA-side: device time per single call from a profiler trace, split into custom-call kernels "
          "and XLA's own ops (n/a: no op timeline in the trace).")
    pairs = sorted({key[:1] + key[2:] for key in times if key[1] == "asym" and (key[0], "sym", *key[2:]) in times})
    if pairs:
        print("\nasym over sym (the second scale's cost):")
        print("| format | M | impl | asym µs | sym µs | asym / sym |\n|---|---|---|---|---|---|")
        for fmt, m, name in pairs:
            ta, ts = times[fmt, "asym", m, name], times[fmt, "sym", m, name]
            print(f"| {fmt} | {m} | {name} | {ta * 1e6:.1f} | {ts * 1e6:.1f} | {ta / ts:.3f} |")
    cases = sorted({key[:3] for key in times})
    if cases:  # the size rules (`preferred`) against this run: is what dispatch picks the fastest measured?
        print("\ndispatch (implementation=None) against the fastest implementation timed here:")
        print("| format | M | dispatch | µs | fastest | µs | dispatch / fastest |\n|---|---|---|---|---|---|---|")
        for fmt, scheme, m in cases:
            timed_here = {name: t for (f, sc, mm, name), t in times.items() if (f, sc, mm) == (fmt, scheme, m)}
            best = min(timed_here, key=timed_here.get)
            pick = dispatched[fmt, scheme, m]
            t_pick = timed_here.get(pick)
            print(f"| {fmt}-{scheme} | {m} | {pick} | {'not timed' if t_pick is None else f'{t_pick * 1e6:.1f}'} "
                  f"| {best} | {timed_here[best] * 1e6:.1f} | "
                  f"{'' if t_pick is None else f'{t_pick / timed_here[best]:.2f}x'} |")
    if failures:
        print("\n".join(["FAILURES:"] + failures))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
