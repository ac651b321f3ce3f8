"""FLOPs of one QAT training step on SmolLM2-135M (XLA's cost analysis of the compiled step), for the step-time
projection to larger models in BUILD_NOTES.

    python scripts/qat_step_cost.py [--batch-size 2] [--seq-len 144] [--format nf3] [--no-remat]

Prints the compiled step's FLOPs, FLOPs per trained token, and that divided by the model's parameter count (the
"k" in k · N FLOPs per token: ~6 for a plain training step, + 2 for the teacher's forward, + 2 for remat).
"""

from __future__ import annotations

import argparse
import json

import afpq_jax as aq
from afpq_jax import assets
from afpq_jax.training import make_student, step_cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=144)
    ap.add_argument("--format", default="nf3")
    ap.add_argument("--no-remat", action="store_true")
    args = ap.parse_args()
    teacher = aq.load(assets.smollm2_hf_dir())
    layout = aq.resolve_rules(aq.default_rules(aq.QuantScheme.create(args.format, group_size=128)),
                              list(teacher.linear_layers()))
    student, _ = make_student(teacher, layout, clip=None)
    cfg = aq.QATConfig(batch_size=args.batch_size, remat=not args.no_remat)
    flops = step_cost(student, teacher, cfg, args.seq_len)
    tokens = args.batch_size * (args.seq_len - 1)
    linears = teacher.linear_layers().values()
    matmul_params = sum(m.in_features * m.out_features for m in linears) + (
        teacher.cfg.vocab_size * teacher.cfg.hidden_size if teacher.cfg.tie_embeddings else 0)  # the tied head
    print(json.dumps({"flops_per_step": flops, "tokens_per_step": tokens, "flops_per_token": flops / tokens,
                      "matmul_params": matmul_params, "flops_per_token_per_matmul_param": flops / tokens / matmul_params,
                      "remat": not args.no_remat, "format": args.format, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "commit": __import__("subprocess").run(
                          ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}))


if __name__ == "__main__":
    main()
