"""SmolLM2-135M perplexity for RTN / GPTQ / AWQ x {INT3, NF3-sym, NF3-asym, FP3-sym, FP3-asym, INT4, NF4-asym, INT2}
at group size 128, on the held-out Wikipedia split (same protocol as benchmarks/ppl_table.py: seq 2048, first 8
windows), calibrated on random windows of the disjoint calibration split.

    python -m benchmarks.ppl_methods [--calib-samples 128] [--calib-seqlen 512] [--out results/ppl_methods.jsonl]
    python -m benchmarks.ppl_methods --methods awq --via-cli   # each conversion = the real CLI, timed, peak RSS

Each configuration is `afpq_jax.quantize_pretrained` in memory (what `python -m afpq_jax.convert --method ...`
writes) or, with ``--via-cli``, that command under ``/usr/bin/time -v`` (wall time and peak RSS of the
conversion are recorded) followed by loading the checkpoint it wrote; then the model is scored. One JSON line
per configuration (reruns skip what the file already has), with the conversion's time per phase and the commit
of the code that ran. RTN rows are read from results/ppl_rtn.jsonl when present.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.eval import perplexity
from benchmarks.experiment import Results, commit, heldout_ids
from benchmarks.experiment import format_label as label

ROWS = [("int3", True), ("nf3", False), ("nf3", True), ("fp3_e2m0", False), ("fp3_e2m0", True), ("int4", True),
        ("nf4", True), ("int2", True)]
METHODS = ["rtn", "gptq", "awq"]


def convert_via_cli(model_path, fmt: str, asym: bool, method: str, args) -> tuple[object, dict]:
    """Runs `python -m afpq_jax.convert` (under /usr/bin/time -v when present); returns (model, measurements)."""
    out = Path(tempfile.mkdtemp(prefix="afpq_ppl_")) / "ckpt"
    cmd = [sys.executable, "-m", "afpq_jax.convert", "--model", str(model_path), "--format", fmt, "--group-size",
           "128", "--method", method, "--calib-samples", str(args.calib_samples), "--calib-seqlen",
           str(args.calib_seqlen), "--out", str(out), "--no-progress", *([] if asym else ["--sym"])]
    timed = Path("/usr/bin/time").exists()
    t0 = time.perf_counter()
    code = commit()  # the code the subprocess imports
    proc = subprocess.run((["/usr/bin/time", "-v"] if timed else []) + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    phase_line = proc.stdout.strip().splitlines()[-1]  # the summary's last line: "  embed 1.2s, gptq 3.4s, ..."
    phases = {k.strip(): float(v) for k, v in re.findall(r"([^,]+?) ([\d.]+)s(?:,|$)", phase_line)}
    measured = {"cli_wall_seconds": round(wall, 1), "phases": phases,
                "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None, "commit": code}
    model = aq.load(out)  # fully in memory
    shutil.rmtree(out.parent, ignore_errors=True)
    return model, measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--out", default="results/ppl_methods.jsonl")
    ap.add_argument("--rtn-results", default="results/ppl_rtn.jsonl")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--via-cli", action="store_true", help="convert with the CLI (timed, peak RSS) and load it")
    ap.add_argument("--report", action="store_true", help="only print the table of what --out already has")
    ap.add_argument("--rows", default=None, help="only these rows, e.g. nf3:asym,int3:asym (default: all)")
    args = ap.parse_args()
    code_commit = commit()  # in-process rows run the code imported now
    model_path = assets.smollm2_hf_dir()
    eval_ids = heldout_ids(model_path)
    calibration = aq.Calibration(text=assets.wiki_text()[0], samples=args.calib_samples, seqlen=args.calib_seqlen,
                                 seed=0)

    def key(r: dict):  # RTN rows come from ppl_table's file too (its rows have no "method")
        if r["format"] == "float":
            return ("float", None, None)
        return (r.get("method", "rtn"), r["format"], r["asym"]) if r.get("group_size") == 128 else None

    results = Results(args.out, key, also=(args.rtn_results,))
    done = results.done
    for method in [] if args.report else args.methods.split(","):
        for fmt, asym in ROWS:
            if args.rows and f"{fmt}:{'asym' if asym else 'sym'}" not in args.rows.split(","):
                continue
            if (method, fmt, asym) in results:
                continue
            scheme = aq.QuantScheme.create(fmt, group_size=128, asym=asym)
            t0 = time.perf_counter()
            if args.via_cli and method != "rtn":
                model, measured = convert_via_cli(model_path, fmt, asym, method, args)
            else:
                model = aq.quantize_pretrained(model_path, aq.default_rules(scheme), method=method,
                                               calibration=calibration if method != "rtn" else None,
                                               progress=False)
                measured = {"phases": dict(model.checkpoint_info.phase_seconds)}
            convert_s = time.perf_counter() - t0
            r = perplexity(model, eval_ids, seq_len=args.seq_len, max_windows=args.max_windows, progress=False)
            results.add({"method": method, "format": fmt, "asym": asym, "group_size": 128, **r,
                         "calib": f"{args.calib_samples}x{args.calib_seqlen}", "convert_seconds": round(convert_s, 1),
                         "commit": code_commit, **measured})
    print("\n| g128 | " + " | ".join(m.upper() for m in METHODS) + " |\n|---|" + "---|" * len(METHODS))
    for fmt, asym in ROWS:
        cells = [f"{done[(m, fmt, asym)]['perplexity']:.2f}" if (m, fmt, asym) in done else "—" for m in METHODS]
        print(f"| {label(fmt, asym)} | " + " | ".join(cells) + " |")
    three_bit = {k: v["perplexity"] for k, v in done.items() if k[0] != "float" and k[1] in ("int3", "nf3",
                                                                                               "fp3_e2m0")}
    if three_bit:
        best = min(three_bit, key=three_bit.get)
        print(f"\nbest 3-bit: {best[0].upper()} {label(best[1], best[2])} ({three_bit[best]:.2f})")


if __name__ == "__main__":
    main()
