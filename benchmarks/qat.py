"""Quantization-aware training (BitDistiller) of a built-in model on this machine: held-out perplexity after N steps.

Each row runs the real CLI (`python -m afpq_jax.train`, under ``/usr/bin/time -v`` for wall time and peak RSS)
and scores the packed checkpoint it wrote with the protocol of the perplexity tables (held-out Wikipedia, seq
2048, the first 8 windows — 4 for Gemma 3, as its perplexity table — led by the tokenizer's BOS where it has one).
The loss history of every row is kept next to the results.

    python -m benchmarks.qat --rows nf3:cakld:100,int2:cakld:100,int2:ce:100 [--lr 5e-5]
    python -m benchmarks.qat --model gemma3-270m --rows nf3:cakld:30 --samples 32 --new-tokens 128
    python -m benchmarks.qat [--model M] --report

``--model``: a built-in model (smollm2-135m-instruct, the default: results/qat_smollm2.jsonl; gemma3-270m:
results/qat_gemma3.jsonl).

A row is format:loss:steps (format nf3 = NF3-asym g128, int2 = INT2-asym g128, as BitDistiller). Self-generated
data: --samples prompts of 16 tokens from the calibration split, each continued by --new-tokens teacher tokens at
temperature 0.7 (cached under afpq-jax's cache directory, shared by rows with the same options).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.eval import bos_prefix, perplexity
from benchmarks.experiment import Results, commit, heldout_ids

FORMATS = {"nf3": "nf3", "int2": "int2"}
# model -> (results file, windows scored)
MODELS = {"smollm2-135m-instruct": ("results/qat_smollm2.jsonl", 8), "gemma3-270m": ("results/qat_gemma3.jsonl", 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="nf3:cakld:100,int2:cakld:100")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also record a quick held-out perplexity (seq 256, 4 windows) every K steps")
    ap.add_argument("--model", default="smollm2-135m-instruct", choices=list(MODELS))
    ap.add_argument("--out", default=None, help="results file (default: the model's)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    out, windows = MODELS[args.model]
    results = Results(args.out or out, key=lambda r: r["row"])
    done = results.done
    if not args.report:
        code = commit()  # the code the rows run (taken now: later commits must not relabel them)
        model_path = assets.BUILTIN_MODELS[args.model]()
        eval_ids = heldout_ids(model_path)
        bos = bos_prefix(aq.load_tokenizer(model_path))
        for row in args.rows.split(","):
            key = f"{row}:lr{args.lr:g}"
            if key in results:
                continue
            fmt, loss, steps = row.split(":")
            with tempfile.TemporaryDirectory() as tmp:
                ckpt, history = Path(tmp) / "model", Path(tmp) / "history.jsonl"
                cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "afpq_jax.train", "--model", str(model_path),
                       "--format", FORMATS[fmt], "--loss", loss, "--steps", steps, "--lr", str(args.lr),
                       "--batch-size", str(args.batch_size), "--samples", str(args.samples),
                       "--new-tokens", str(args.new_tokens), "--calib-samples", str(args.calib_samples),
                       "--eval-every", str(args.eval_every),
                       "--history", str(history), "--out", str(ckpt), "--no-progress"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(proc.stderr[-3000:])
                wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
                peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
                qc = json.loads((ckpt / "quantization_config.json").read_text())
                r = perplexity(aq.load(ckpt), eval_ids, seq_len=2048, max_windows=windows, progress=False,
                               bos_token_id=bos)
                rec = {"row": key, "model": args.model, "windows": r["windows"], "format": fmt, "loss": loss,
                       "steps": int(steps), "lr": args.lr,
                       "samples": args.samples, "new_tokens": args.new_tokens, "batch_size": args.batch_size,
                       "perplexity": r["perplexity"], "training": qc["training"],
                       "history": [json.loads(line) for line in history.read_text().splitlines()],
                       "wall": wall.group(1) if wall else None,
                       "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None,
                       "summary": proc.stdout.strip().splitlines()[-1], "commit": code}
            results.add(rec, quiet=("history",))
    for key, r in done.items():
        losses = [h["loss"] for h in r["history"]]
        print(f"{key:28s} ppl {r['perplexity']:8.2f}  loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
              f"{r['training']['tokens']:,} tokens  {r['wall']}  {r['peak_rss_mb']} MiB")


if __name__ == "__main__":
    main()
