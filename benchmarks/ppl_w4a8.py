"""SmolLM2-135M perplexity with int8 activations (W4A8, FPTQ) next to the same weights with float activations.

Same protocol as benchmarks/ppl_methods.py: held-out Wikipedia split, seq 2048, first 8 windows; calibration on 128
random windows of 512 tokens of the disjoint calibration split (weights: GPTQ; activations: max|x| statistics).

    python -m benchmarks.ppl_w4a8                       # every row (reruns skip rows --out already has)
    python -m benchmarks.ppl_w4a8 --rows int4:rtn:a16,int4:rtn:fptq
    python -m benchmarks.ppl_w4a8 --report              # only print the tables from --out

A row is weights:method:activations with weights int4 (asym g128), fp4 (fp4_e2m1 asym g128), int4-is / fp4-is
(the same with integer group scales: uint8 multiples of a per-channel scale, one int8 GEMM per layer) or int8
(sym, per-channel: W8A8), method rtn / gptq, activations a16 (float), static, dynamic, fptq (the paper's thresholds
15 / 150), fptq-lae (LAE wherever it folds, then the paper's rule), fptq-rel (the relative rule: LAE wherever it
folds, static where max|x| <= 8 x the median token's max|x|), fptq-rel-a16 (the fptq-rel checkpoint with every
layer's activations set back to float: the same LAE-folded weights as W4A16), smoothquant (alpha 0.5, per-token
dynamic).
Each row is `afpq_jax.quantize_pretrained` in memory (what ``python -m afpq_jax.convert --act-bits 8
--act-scheme ...`` writes), then `afpq_jax.eval.perplexity`; one JSON line per row with the share of layers per
activation mode, the max|x| profile per layer type and the commit of the code that ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.eval import perplexity
from benchmarks.experiment import Results, commit, heldout_ids

WEIGHTS = {"int4": ("int4", 128, True, False), "fp4": ("fp4_e2m1", 128, True, False),
           "int4-is": ("int4", 128, True, True), "fp4-is": ("fp4_e2m1", 128, True, True),
           "int8": ("int8", None, False, False)}
ACTS = {
    "a16": None,
    "static": aq.ActivationQuant(scheme="static"),
    "dynamic": aq.ActivationQuant(scheme="dynamic"),
    "fptq": aq.ActivationQuant(scheme="fptq"),
    "fptq-lae": aq.ActivationQuant(scheme="fptq", thresholds=(0.0, 150.0)),
    "fptq-rel": aq.ActivationQuant(scheme="fptq", rule="relative"),
    "fptq-rel-a16": aq.ActivationQuant(scheme="fptq", rule="relative"),  # same weights, activations left float
    "smoothquant": aq.ActivationQuant(scheme="smoothquant"),
}
DEFAULT_ROWS = [f"{w}:rtn:{a}" for w in ("int4", "fp4") for a in ACTS] + ["int8:rtn:a16", "int8:rtn:smoothquant"]


def activation_profile(model: aq.CausalLM) -> dict:
    """Layers per activation mode / fold, and the median / max over blocks of max|x| (before folds) and of the
    relative rule's token ratio, per layer type."""
    record = json.loads(model.checkpoint_info.quantization)
    per_type: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    modes: dict[str, int] = {}
    for block in (record.get("report") or {}).values():
        for name, d in block.get("activations", {}).items():
            key = f"{d['mode']}{'+' + d['fold'] if d.get('fold') else ''}"
            modes[key] = modes.get(key, 0) + 1
            if d.get("max_abs") is not None:
                per_type.setdefault(name.split(".")[-1], []).append(d["max_abs"])
            if d.get("token_ratio") is not None:
                ratios.setdefault(name.split(".")[-1], []).append(d["token_ratio"])

    def summary(values: dict[str, list[float]]) -> dict:
        return {t: {"median": round(statistics.median(v), 2), "max": round(max(v), 2)} for t, v in values.items()}

    return {"modes": dict(sorted(modes.items())), "max_abs": summary(per_type), "token_ratio": summary(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--out", default="results/ppl_w4a8.jsonl")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    results = Results(args.out, key=lambda r: r["row"])
    done = results.done
    if not args.report:
        code = commit()
        model_path = assets.smollm2_hf_dir()
        eval_ids = heldout_ids(model_path)
        calibration = aq.Calibration(text=assets.wiki_text()[0], samples=args.calib_samples,
                                     seqlen=args.calib_seqlen, seed=0)
        for row in args.rows.split(","):
            if row in results:
                continue
            weights, method, acts = row.split(":")
            fmt, group, asym, integer_scales = WEIGHTS[weights]
            scheme = aq.QuantScheme.create(fmt, group_size=group, asym=asym, integer_scales=integer_scales)
            t0 = time.perf_counter()
            model = aq.quantize_pretrained(model_path, aq.default_rules(scheme), method=method,
                                           calibration=calibration, activations=ACTS[acts], progress=False)
            convert_s = time.perf_counter() - t0
            if acts.endswith("-a16"):
                for layer in model.linear_layers().values():
                    if layer.is_quantized:
                        layer.set_activation_quant(None, None)
            r = perplexity(model, eval_ids, seq_len=args.seq_len, max_windows=args.max_windows, progress=False)
            results.add({"row": row, "weights": str(scheme), "method": method, "activations": acts, **r,
                         **activation_profile(model), "calib": f"{args.calib_samples}x{args.calib_seqlen}",
                         "convert_seconds": round(convert_s, 1), "commit": code})
    print("\n| weights | method | " + " | ".join(ACTS) + " |\n|---|---|" + "---|" * len(ACTS))
    for weights in WEIGHTS:
        for method in ("rtn", "gptq"):
            cells = []
            for acts in ACTS:
                r = done.get(f"{weights}:{method}:{acts}")
                base = done.get(f"{weights}:{method}:a16")
                if r is None:
                    cells.append("—")
                elif base is None or acts == "a16":
                    cells.append(f"{r['perplexity']:.2f}")
                else:
                    cells.append(f"{r['perplexity']:.2f} ({100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%)")
            if any(c != "—" for c in cells):
                print(f"| {weights} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
