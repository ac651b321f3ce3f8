"""SmolLM2-135M perplexity on the held-out Wikipedia split: float vs RTN in the layout of AFPQ's Table 1.

Rows: INT4, NF4-sym, NF4-asym, FP4-sym, FP4-asym, INT3, NF3-sym, NF3-asym, FP3-sym, FP3-asym (INT = asym
min/max, AutoGPTQ's baseline); columns: per-channel, g128, g64. Every linear layer of the decoder blocks is
quantized (embeddings / tied lm_head stay float), fp16 scales; the quantized kernels are `fake_quant` values,
bit-identical to what a converted checkpoint dequantizes to (tests/test_convert.py checks that equality).

    python -m benchmarks.ppl_table [--seq-len 2048] [--max-windows 8] [--out results/ppl_rtn.jsonl]

Results are appended one JSON line per configuration (a rerun skips configurations already in the file), then
printed as a markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.eval import perplexity
from benchmarks.experiment import Results, commit, heldout_ids
from benchmarks.experiment import format_label as label

ROWS = [("int4", True), ("nf4", False), ("nf4", True), ("fp4_e2m1", False), ("fp4_e2m1", True),
        ("int3", True), ("nf3", False), ("nf3", True), ("fp3_e2m0", False), ("fp3_e2m0", True)]
COLS = [None, 128, 64]


def col_label(g) -> str:
    return "per-channel" if g is None else f"g{g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--out", default="results/ppl_rtn.jsonl")
    args = ap.parse_args()
    model_path = args.model or str(assets.smollm2_hf_dir())
    model = aq.load(model_path)
    ids = heldout_ids(model_path)
    results = Results(args.out, key=lambda r: (r["format"], r["asym"], r["group_size"]))
    done = results.done
    code = commit()
    kernels = {p: layer.kernel.get_value() for p, layer in model.linear_layers().items() if p != "lm_head"}

    def run(key, quant):
        if key in results:
            return
        for p, w in kernels.items():
            model.linear_layers()[p].kernel.set_value(quant(w) if quant else w)
        t0 = time.perf_counter()
        r = perplexity(model, ids, seq_len=args.seq_len, max_windows=args.max_windows, progress=False)
        results.add({"format": key[0], "asym": key[1], "group_size": key[2], **r,
                     "seconds": round(time.perf_counter() - t0, 1), "commit": code})

    run(("float", None, None), None)
    for fmt, asym in ROWS:
        for g in COLS:
            run((fmt, asym, g), lambda w, fmt=fmt, asym=asym, g=g: jax.block_until_ready(
                aq.fake_quant(w, fmt, group_size=g, asym=asym)))
    f = done[("float", None, None)]
    print(f"\nSmolLM2-135M-Instruct, held-out Wikipedia, seq {f['seq_len']}, {f['windows']} windows "
          f"({f['tokens']} predicted tokens). Float: {f['perplexity']:.2f}\n")
    print("| RTN | " + " | ".join(col_label(g) for g in COLS) + " |")
    print("|---|" + "---|" * len(COLS))
    for fmt, asym in ROWS:
        cells = [f"{done[(fmt, asym, g)]['perplexity']:.2f}" if (fmt, asym, g) in done else "—" for g in COLS]
        print(f"| {label(fmt, asym)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
