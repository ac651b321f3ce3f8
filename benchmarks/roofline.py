"""Decode roofline for `afpq_jax.kernels.quantized_matmul`: bytes per weight and the bound on speedup over bf16.

Prints (markdown with --markdown):
  1. bits / bytes per weight (codes + scales [+ s_neg] [+ zero points], fp16 scales) and the bound 16 / bits for
     int2/int3/int4/fp3/fp4/nf3/nf4 x group 32/64/128/256/per-channel (K=4096) x sym/asym;
  2. decode (M = 1, 16) at K = N = 4096 on TPU v5e and H100: time of a bf16 matmul and of the packed one at the
     HBM roofline (weights + x + output), and the bytes each kernel's default tiling moves relative to that
     ideal (1.00 = no redundant reads of codes, scales or x; "x_prep" = the XLA pass that permutes x);
  3. vector ops per weight of each kernel's decode path (`roofline.kernel_ops`, a static count of the traced
     kernel body): the ALU side of the roofline.

    python -m benchmarks.roofline [--markdown] [--k 4096] [--n 4096]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import afpq_jax
from afpq_jax.kernels import IMPLEMENTATIONS, BlockConfig, Problem, quantized_matmul, resolve, roofline

FORMATS = ("int2", "int3", "int4", "fp3_e2m0", "fp4_e2m1", "nf3", "nf4")
GROUPS = (32, 64, 128, 256, None)
DEVICES = (("TPU v5e", "TPU v5 lite"), ("H100 SXM", "NVIDIA H100 80GB HBM3"))
OPS_CASES = (("int4", 128, True), ("int4", 128, False), ("fp4_e2m1", 128, True), ("fp4_e2m1", 128, False),
             ("nf4", 128, True), ("nf4", 128, False), ("nf3", 128, True), ("fp3_e2m0", 128, True),
             ("nf4", 256, True), ("nf3", 512, True), ("int2", 128, True))
DECODE_CASES = (("int4", 128, True), ("fp4_e2m1", 128, True), ("nf4", 128, True), ("nf4", 64, True),
                ("nf3", 128, True), ("int3", 128, True), ("int2", 128, True), ("nf4", None, False))


def table(rows, header, markdown):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    if markdown:
        out = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    else:
        out = ["  ".join(str(h).rjust(w) for h, w in zip(header, widths))]
        out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    print("\n".join(out))


def _abstract_weight(fmt, g, asym, k, n):
    return jax.eval_shape(lambda w: afpq_jax.quantize(w, fmt, group_size=g, asym=asym),
                          jax.ShapeDtypeStruct((k, n), jnp.float32))


def _problem(fmt, g, asym, m, k, n):
    return Problem.create((m, k), jnp.bfloat16, _abstract_weight(fmt, g, asym, k, n))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    a = ap.parse_args()

    print(f"## Bits per weight (K={a.k}, fp16 scales) and decode speedup bound vs bf16 (16 / bits)\n")
    rows = []
    for fmt in FORMATS:
        for asym in (True, False):
            cells = []
            for g in GROUPS:
                wb = roofline.weight_bits(fmt, g, asym, k=a.k)
                cells.append(f"{wb.bits:.3f} / {wb.bound_vs_bf16:.2f}x")
            rows.append([fmt, "asym" if asym else "sym", *cells])
    table(rows, ["format", "scheme", *[f"g{g}" if g else "per-channel" for g in GROUPS]], a.markdown)
    print("\n(cell: bits/weight / bound; asym = AFPQ s_pos+s_neg for FP/NF, scale+uint8 zero point for INT; "
          "bytes/weight = bits/8)\n")

    print(f"## Decode at K={a.k}, N={a.n}, bf16 activations: roofline time and kernel traffic / ideal\n")
    rows = []
    for fmt, g, asym in DECODE_CASES:
        for m in (1, 16):
            prob = _problem(fmt, g, asym, m, a.k, a.n)
            ideal = roofline.ideal_bytes(prob)
            act = (m * a.k + m * a.n) * 2
            dense = 2 * a.k * a.n + act
            times = []
            for _, kind in DEVICES:
                bw = roofline.hbm_bandwidth(kind)
                times.append(f"{dense / bw * 1e6:.2f} / {ideal / bw * 1e6:.2f}")
            ratios = []
            for impl in ("mosaic_tpu", "triton", "mosaic_gpu"):
                cfg = resolve(impl, prob, None)
                if IMPLEMENTATIONS[impl].supports(prob, cfg) is not None:
                    ratios.append("declined")
                    continue
                b = roofline.kernel_hbm_bytes(impl, prob, cfg)
                ratios.append(f"{(b['total'] - b['x_prep']) / ideal:.3f} (+{b['x_prep'] / ideal:.3f})")
            rows.append([f"{fmt}-{'asym' if asym else 'sym'}", "channel" if g is None else g, m,
                         f"{ideal / (a.k * a.n):.4f}", f"{dense / ideal:.2f}x", *times, *ratios])
    table(rows, ["format", "group", "M", "bytes/weight (incl. x, out)", "bound vs bf16",
                 *[f"{d} µs bf16 / packed" for d, _ in DEVICES],
                 "mosaic_tpu bytes/ideal (+x_prep)", "triton", "mosaic_gpu"], a.markdown)
    print("\nHBM: " + ", ".join(f"{d} {roofline.hbm_bandwidth(k) / 1e9:.0f} GB/s" for d, k in DEVICES)
          + ". mosaic_gpu pads M to 64 rows in HBM (it is the prefill kernel);\nGPU kernels re-read x per N tile from "
          "L2 (not counted); the Triton split-K partial sums are counted.")

    print(f"\n## Vector ops per weight in each kernel's decode path (static count of the traced kernel body, "
          f"K={a.k}, N={a.n}, bf16 x)\n")
    kernels = (("mosaic_tpu", None), ("mosaic_tpu", BlockConfig(lookup=True)), ("triton", None),
               ("triton", BlockConfig(lookup=False)), ("mosaic_gpu", None))
    rows = []
    for fmt, g, asym in OPS_CASES:
        for m in (1, 16):
            prob = _problem(fmt, g, asym, m, a.k, a.n)
            x = jax.ShapeDtypeStruct((m, a.k), jnp.bfloat16)
            qt = _abstract_weight(fmt, g, asym, a.k, a.n)
            cells = []
            for impl, config in kernels:
                if IMPLEMENTATIONS[impl].supports(prob, resolve(impl, prob, config)) is not None:
                    cells.append("declined")
                    continue
                ops = roofline.kernel_ops(jax.make_jaxpr(
                    lambda x, q: quantized_matmul(x, q, implementation=impl, config=config))(x, qt))
                lookups = f" + {ops.loads:.0f} lookup" if ops.loads else ""
                cells.append(f"{ops.ops:.1f} ({ops.weighted:.1f}){lookups}")
            rows.append([f"{fmt}-{'asym' if asym else 'sym'}", "channel" if g is None else g, m, *cells])
    table(rows, ["format", "group", "M", "mosaic_tpu", "mosaic_tpu (lookup=True)", "triton",
                 "triton (lookup=False)", "mosaic_gpu"], a.markdown)
    print("\nElementwise arithmetic / logic / select / convert elements per weight multiplied, before compiler "
          "simplification\n(`roofline.kernel_ops`); \"lookup\" = reads from the level table (L1-resident on GPU). "
          "x-side work\n(index arithmetic of Triton's strided x loads) is spread over the weights it feeds. In "
          "parentheses: the same ops weighted by throughput\nclass (`roofline.ISSUE_COST`: float32 FMA slots; a "
          "convert costs 8, an integer op 2).")


if __name__ == "__main__":
    main()
