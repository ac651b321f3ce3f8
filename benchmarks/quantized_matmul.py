"""Benchmark `afpq_jax.kernels.quantized_matmul` against dense matmuls of the same shape, with timers a device
can trust.

For every format, M and implementation available on the default backend ("xla" everywhere; "cpu" and "xla_scan"
on CPU; "mosaic_tpu" on TPU; "triton" and "mosaic_gpu" on GPU, where they accept the shape) it first checks the
output against "xla", then times it two ways:

* e2e: wall clock per matmul of one jitted loop with a static trip count (no host round trip per iteration)
  over a rotation of distinct weights, at least 8 and at least twice the 50 MiB L2 in bytes (`rotation`), so
  every matmul reads its weight from HBM; the difference of two trip counts drops dispatch and fixed costs;
* kernel / XLA-side: device timestamps from a profiler trace of that loop, split into the op's kernels and the
  rest (`profiled`).

Dense float32 and bfloat16 ``x @ W`` of the same shape are timed the same way on the same card. On a TPU / GPU
each row also gives GB/s and the fraction of the HBM roofline (ideal bytes: packed weight + x + output,
`roofline.ideal_bytes`; bandwidth by device_kind in `roofline.HBM_BANDWIDTH`) for both timers.

    python -m benchmarks.quantized_matmul --headline --markdown   # on a device: the device check's first table
    python -m benchmarks.quantized_matmul --x-dtype float32 --loops 4   # CPU: C++ kernel, scan, xla; M=1, 16
    python -m benchmarks.quantized_matmul --m 1 16 128 --formats nf4 nf3 int4 --markdown   # on a device
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import afpq_jax
from afpq_jax.kernels import (IMPLEMENTATIONS, BlockConfig, Problem, current_backend, quantized_matmul,
                              resolve, roofline, select_implementation)


L2_BYTES = 50 * 2**20  # H100 / H200 L2; a rotation of weights at least twice this size never stays in it


def rotation(weight_bytes: float, *, minimum: int = 8, l2_bytes: int = L2_BYTES) -> int:
    """Distinct weights a timed loop rotates through: at least ``minimum`` and at least twice the L2 cache in
    bytes, so each matmul reads its weight from HBM (one L2-resident weight times the cache, not the kernel)."""
    return max(minimum, math.ceil(2 * l2_bytes / max(weight_bytes, 1.0)))


def weight_rotation(fmt: str, group: int | None, asym: bool, k: int, n: int) -> int:
    """`rotation` for packed (K, N) weights of this scheme (codes and per-group arrays)."""
    return rotation(roofline.weight_bits(fmt, group, asym, k=k).bits / 8 * k * n)


def looped(op, rounds: int):
    """One executable running ``rounds`` passes over every pair ``op(x_i, w_i)``.

    ``rounds`` is a Python int: the loop's trip count is static. (A traced count makes XLA's GPU while loop copy
    its predicate to the host and synchronise every iteration, and then everything under ~30 µs measures the
    host's launch rate.) x and the weight's first array carry one element written from the previous output, so
    XLA can neither hoist a matmul (or the "xla" path's dequantization) out of the loop nor drop one; the writes
    are in place (one element of the loop carry)."""
    def touch(a, c):
        idx = (0,) * a.ndim
        return a.at[idx].set(a[idx] + (c > 1).astype(a.dtype))  # c stays < 1e-3: values unchanged

    def run(xs, ws):
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
        return jax.lax.fori_loop(0, rounds, body, (list(xs), list(ws), jnp.float32(0)))[2]
    return jax.jit(run)


class Timing(NamedTuple):
    """Seconds per matmul. ``e2e``: wall clock of the device-side loop (`looped`), the difference of two trip
    counts (host dispatch and the loop's fixed costs drop out). ``kernel`` / ``xla_side``: device timestamps of a
    profiler trace of one loop call, summed over its ops and divided by its matmuls: the op's kernels (ours, a
    library GEMM or XLA's own GEMM fusion) and everything else (x casts, the split-K sum, dequantization, the
    loop's one-element writes). None where the trace has no op timeline."""

    e2e: float  # nan when the extra rounds took no measurable time (noise): raise --loops
    kernel: float | None
    xla_side: float | None


def measure(op, xs, ws, *, reps: int, loops: int, profile: bool = True) -> Timing:
    """`Timing` of ``op`` over the rotation ``zip(xs, ws)``: medians of ``reps`` calls after a warm-up."""
    short, long_ = looped(op, loops), looped(op, 2 * loops)

    def median(fn):
        jax.block_until_ready(fn(xs, ws))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(xs, ws))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    matmuls = loops * len(ws)
    diff = median(long_) - median(short)
    e2e = diff / matmuls if diff > 0 else math.nan  # noise larger than the extra rounds: no measurement
    parts = profiled(short, (xs, ws), matmuls) if profile else None
    return Timing(e2e, *(parts or (None, None)))


# Where a profiler trace keeps the op timeline: GPU stream lines, TPU's "XLA Ops" line, the CPU client's thunks
# (on its own threads, or on XLA's Eigen pool when the executable runs there).
def _timeline_lines(plane):
    for line in plane.lines:
        if plane.name.startswith("/device:GPU") and line.name.startswith("Stream"):
            yield line
        elif plane.name.startswith("/device:TPU") and line.name == "XLA Ops":
            yield line
        elif plane.name == "/host:CPU" and line.name.startswith(("tf_XLAPjRtCpuClient", "tf_XLAEigen")):
            yield line


# An event is kernel time when its name or HLO op names one of these: our Pallas kernels ("afpq_qmm", "mosaic",
# "triton"), custom and FFI calls (the C++ kernel), library GEMMs (cuBLAS / cuBLASLt / CUTLASS kernel names),
# XLA's GEMM fusions and its own dots (on CPU, YNNPACK's fusions).
KERNEL_MARKERS = ("afpq_qmm", "custom-call", "custom_call", "ffi_call", "triton", "mosaic", "gemm", "cublas",
                  "cutlass", "xmma", "nvjet", "dot", "ynn_")


def profiled(fn, args, matmuls: int) -> tuple[float, float] | None:
    """(kernel, XLA-side) seconds per matmul from a profiler trace of one call of ``fn(*args)`` that runs
    ``matmuls`` matmuls: summed device durations of the timeline's ops (summed over streams and threads, so not
    wall time; host dispatch and idle gaps are in neither). None when the trace has no op timeline or the
    profiler fails."""
    import glob
    import tempfile

    jax.block_until_ready(fn(*args))
    try:
        from jax.profiler import ProfileData  # inside: a jax without it must not fail the timed row

        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                jax.block_until_ready(fn(*args))
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
                if ev.name.startswith(("while", "WhileThunk")):  # the loop itself: its ops are events of their own
                    continue
                seen = True
                hlo = dict(ev.stats).get("hlo_op", "")
                if any(k in ev.name.lower() or k in str(hlo).lower() for k in KERNEL_MARKERS):
                    kernel += ev.duration_ns
                else:
                    other += ev.duration_ns
    return (kernel * 1e-9 / matmuls, other * 1e-9 / matmuls) if seen else None


def implementation_variants(impls, triton_lookup: str,
                            triton_gemv: bool = False) -> list[tuple[str, BlockConfig | None]]:
    """(row label, config) per timed variant: "triton" is the default config (table lookup), "triton-tree" is
    Triton with BlockConfig(lookup=False); ``triton_lookup`` is "on", "off" or "both". ``triton_gemv`` adds
    "triton-gemv", the GEMV variant (its config depends on M: `variant_config`)."""
    variants = []
    for name in impls:
        if name != "triton":
            variants.append((name, None))
            continue
        if triton_lookup in ("on", "both"):
            variants.append((name, None))
        if triton_lookup in ("off", "both"):
            variants.append(("triton-tree", BlockConfig(lookup=False)))
        if triton_gemv:
            variants.append(("triton-gemv", None))
    return variants


def variant_config(label: str, config: BlockConfig | None, m: int) -> BlockConfig | None | str:
    """The config a variant runs at ``m`` rows, or the reason it does not apply. "triton-gemv": one tile of
    M rows (a power of two), for M <= 4."""
    if label != "triton-gemv":
        return config
    if m > 4:
        return "the GEMV variant is for M <= 4"
    return BlockConfig(block_m=1 << (m - 1).bit_length())


# The device check's headline cases (K and N stay at their flags' defaults, 4096).
HEADLINE = dict(m=[1, 16], formats=["int4", "nf4"], group_size=128, schemes=["asym"], triton_lookup="both",
                triton_gemv=True)


def launch_summary(impl: str, prob, cfg) -> str:
    """"programs / shared memory KiB" of a kernel call, where the implementation reports it (Triton)."""
    launch = getattr(IMPLEMENTATIONS[impl], "launch", None)
    info = None if launch is None else launch(prob, cfg)
    return "" if info is None else f"{info['programs']} / {info['smem_bytes'] / 1024:.0f}"


def _known(t: float | None) -> bool:
    return t is not None and t > 0 and not math.isnan(t)


def _fmt_us(t: float | None) -> str:
    return f"{t * 1e6:.1f}" if _known(t) else "n/a"


def ratio(t: float | None, base: float | None, fmt: str = "{:.2f}x") -> str:
    return fmt.format(t / base) if _known(t) and _known(base) else "n/a"


def per_s(amount: float, t: float | None, fmt: str) -> str:
    """``amount / t`` formatted, or n/a without a time."""
    return fmt.format(amount / t) if _known(t) else "n/a"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headline", action="store_true",
                    help="the device check's headline table: INT4-asym and NF4-asym, M = 1 and 16, g128, Triton "
                         "lookup on and off and its GEMV variant, xla, dense (overrides --m, --formats, "
                         "--group-size, --schemes)")
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
    ap.add_argument("--triton-gemv", action="store_true",
                    help="also time Triton's GEMV variant (block_m < 16, M <= 4) as 'triton-gemv'")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the profiler trace (kernel / XLA-side device time)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--loops", type=int, default=None,
                    help="rounds over the weights in the shorter of the two timed loops (default: 10 on an "
                         "accelerator, 1 on CPU)")
    ap.add_argument("--stack", type=int, default=None,
                    help="distinct weights rotated per round (default on an accelerator: >= 8 and >= twice the "
                         "50 MiB L2 in packed bytes, so no weight is read from L2; 1 on CPU)")
    ap.add_argument("--markdown", action="store_true", help="markdown rows, printed as each case finishes")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new (format, M) case after this many seconds; the rest are listed as skipped")
    a = ap.parse_args(argv)
    if a.headline:
        for key, value in HEADLINE.items():
            setattr(a, key, value)

    backend = current_backend()
    dev = jax.devices()[0]
    bw = roofline.hbm_bandwidth(dev.device_kind) if backend != "cpu" else None
    print(f"device: {dev.device_kind} ({backend}), jax {jax.__version__}, HBM "
          f"{'%.0f GB/s' % (bw / 1e9) if bw else 'n/a'}; median of {a.reps} runs after warm-up; K={a.k} N={a.n}")
    g = None if a.group_size == 0 else a.group_size
    xdt = jnp.dtype(a.x_dtype)
    impls = a.impls or [n for n in IMPLEMENTATIONS if n == "xla" or IMPLEMENTATIONS[n].backend == backend]
    variants = implementation_variants(impls, a.triton_lookup, a.triton_gemv)
    schemes = a.schemes or (["sym"] if a.sym else ["asym"])

    # One rotation for every case: sized for the smallest packed weight timed, so no weight set fits in L2.
    if a.stack:
        r = a.stack
    elif backend == "cpu":
        r = 1
    else:
        r = max(weight_rotation(f, g, s == "asym", a.k, a.n) for f in a.formats for s in schemes)
    loops = a.loops or (10 if backend != "cpu" else 1)
    print(f"e2e = wall clock per matmul of a device-side loop with a static trip count: (loop of {2 * loops} "
          f"rounds - loop of {loops}) / ({loops} x {r}); each round rotates {r} distinct weights (--stack). "
          f"kernel / XLA-side = device timestamps from a profiler trace of the {loops}-round loop"
          + ("" if a.profile else " (off: --no-profile)") + ".")
    kw, kx = jax.random.split(jax.random.key(0))
    weight_keys = jax.random.split(kw, r)
    dense = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)

    def dense_op(x, w):
        return dense(x, w).astype(x.dtype)

    header = ["case", "M", "impl", "e2e µs (loop)", "kernel µs (profiler)", "XLA-side µs (profiler)",
              "e2e vs dense f32", "e2e vs dense bf16", "kernel vs dense bf16 kernel", "TFLOP/s (e2e)",
              "programs / smem KiB"]
    if bw:
        header += ["GB/s (kernel)", "of roofline (kernel)", "of roofline (e2e)", "bound vs bf16"]
    rows, failures, times, dense_times, dispatched = [], [], {}, {}, {}
    start = time.perf_counter()

    def emit(row):
        rows.append(row + [""] * (len(header) - len(row)))
        if a.markdown:
            print("| " + " | ".join(str(c) for c in rows[-1]) + " |", flush=True)

    if a.markdown:
        print("| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|", flush=True)
    for fmt, scheme in [(f, s) for f in a.formats for s in schemes]:
        asym = scheme == "asym"
        qts = [afpq_jax.quantize(jax.random.normal(k, (a.k, a.n), jnp.float32), fmt, group_size=g, asym=asym)
               for k in weight_keys]
        qt = qts[0]
        for m in a.m:
            if a.budget_s is not None and time.perf_counter() - start > a.budget_s:
                emit([f"{fmt}-{scheme}", m, "", "skipped: --budget-s reached"])
                continue
            xs = [jax.random.normal(k, (m, a.k), jnp.float32) for k in jax.random.split(kx, r)]
            fresh = m not in dense_times
            if fresh:  # the same dense matmuls for every format: timed once per M, the same way
                ws32 = [jax.random.normal(k, (a.k, a.n), jnp.float32) for k in weight_keys]
                dense_times[m] = (
                    measure(dense_op, xs, ws32, reps=a.reps, loops=loops, profile=a.profile),
                    measure(dense_op, [x.astype(jnp.bfloat16) for x in xs],
                            [w.astype(jnp.bfloat16) for w in ws32], reps=a.reps, loops=loops, profile=a.profile))
                del ws32
            d32, d16 = dense_times[m]
            xq = xs[0].astype(xdt)
            xqs = [x.astype(xdt) for x in xs]
            prob = Problem.create(xq.shape, xq.dtype, qt)
            dispatched[fmt, scheme, m] = select_implementation(prob, log=False)[0]
            ref = None
            for name, config in variants:
                impl = name.removesuffix("-tree").removesuffix("-gemv")
                config = variant_config(name, config, m)
                if isinstance(config, str):
                    emit([f"{fmt}", m, name, f"declined: {config}"])
                    continue
                cfg = resolve(impl, prob, config)
                why = IMPLEMENTATIONS[impl].supports(prob, cfg)
                if why is not None:
                    emit([f"{fmt}", m, name, f"declined: {why}"])
                    continue
                op = functools.partial(quantized_matmul, implementation=impl, config=config)
                try:
                    y = np.asarray(jax.jit(op)(xq, qt), np.float32)
                    if ref is None:
                        ref = np.asarray(quantized_matmul(xq, qt, implementation="xla"), np.float32)
                    err = float(np.max(np.abs(y - ref)) / (np.max(np.abs(ref)) + 1e-30))
                    if err > (1e-5 if xdt == jnp.float32 else 2e-2):
                        failures.append(f"{name} {fmt} M={m}: relative error {err:.2e} vs xla")
                        emit([f"{fmt}", m, name, f"WRONG: relative error {err:.2e} vs xla"])
                        continue
                    t = measure(op, xqs, qts, reps=a.reps, loops=loops, profile=a.profile)
                except Exception as e:  # a kernel that fails to compile or run is a finding, not the end of the run
                    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                    failures.append(f"{name} {fmt} M={m}: {type(e).__name__}: {msg}")
                    emit([f"{fmt}", m, name, f"FAILED: {type(e).__name__}: {msg}"])
                    continue
                times[fmt, scheme, m, name] = t
                row = [f"{fmt}-{scheme}-g{g or 'ch'}", m, name, _fmt_us(t.e2e), _fmt_us(t.kernel),
                       _fmt_us(t.xla_side), ratio(t.e2e, d32.e2e), ratio(t.e2e, d16.e2e),
                       ratio(t.kernel, d16.kernel), per_s(2 * m * a.k * a.n / 1e12, t.e2e, "{:.2f}"),
                       launch_summary(impl, prob, cfg)]
                if bw:
                    ideal = roofline.ideal_bytes(prob)
                    row += [per_s(ideal / 1e9, t.kernel, "{:.0f}"), per_s(ideal / bw, t.kernel, "{:.1%}"),
                            per_s(ideal / bw, t.e2e, "{:.1%}"),
                            f"{roofline.decode_bound(fmt, g, asym, m, a.k, a.n, xdt.itemsize):.2f}x"]
                emit(row)
            if fresh:
                for label, d in (("dense f32", d32), ("dense bf16", d16)):
                    row = ["dense", m, label, _fmt_us(d.e2e), _fmt_us(d.kernel), _fmt_us(d.xla_side)]
                    if bw and label == "dense bf16":  # 2 bytes per weight, x and out in bf16
                        ideal = 2 * (a.k * a.n + m * a.k + m * a.n)
                        row += [""] * 5 + [per_s(ideal / 1e9, d.kernel, "{:.0f}"),
                                           per_s(ideal / bw, d.kernel, "{:.1%}"), per_s(ideal / bw, d.e2e, "{:.1%}")]
                    emit(row)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    if not a.markdown:
        print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    print("ratios: time of the quantized op / time of the dense matmul (< 1 = faster). e2e is the op as a user "
          "calls it (x casts, kernel, split-K sum) inside a device-side loop; kernel and XLA-side are device time "
          "from the profiler (n/a: no op timeline in the trace). GB/s and roofline: ideal bytes (packed weight, "
          "x, output once) over that time.")
    pairs = sorted({key[:1] + key[2:] for key in times if key[1] == "asym" and (key[0], "sym", *key[2:]) in times})
    if pairs:
        print("\nasym over sym (the second scale's cost, e2e):")
        print("| format | M | impl | asym µs | sym µs | asym / sym |\n|---|---|---|---|---|---|")
        for fmt, m, name in pairs:
            ta, ts = times[fmt, "asym", m, name].e2e, times[fmt, "sym", m, name].e2e
            print(f"| {fmt} | {m} | {name} | {_fmt_us(ta)} | {_fmt_us(ts)} | {ratio(ta, ts, '{:.3f}')} |")
    cases = sorted({key[:3] for key in times})
    if cases:  # the size rules (`preferred`) against this run: is what dispatch picks the fastest measured?
        print("\ndispatch (implementation=None) against the fastest implementation timed here (e2e):")
        print("| format | M | dispatch | µs | fastest | µs | dispatch / fastest |\n|---|---|---|---|---|---|---|")
        for fmt, scheme, m in cases:
            timed_here = {name: t.e2e for (f, sc, mm, name), t in times.items()
                          if (f, sc, mm) == (fmt, scheme, m) and _known(t.e2e)}
            if not timed_here:
                continue
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
