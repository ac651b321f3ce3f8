"""`python -m afpq_jax.train`: quantization-aware training by self-distillation (BitDistiller) into a packed
afpq-jax checkpoint.

The float model is the teacher; the student is the same model with its quantized layers in fake-quant mode,
clipped by the two-sided search on calibration text, trained on sequences the teacher writes itself (CAKLD by
default), and written like `python -m afpq_jax.convert` writes (loadable by `afpq_jax.load`, evaluable by
`python -m afpq_jax.eval`). With no arguments: SmolLM2-135M-Instruct to NF3-asym g128.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import afpq_jax as aq
from afpq_jax._src import cli
from afpq_jax._src.assets import DEFAULT_MODEL
from afpq_jax._src.io import outputs
from afpq_jax._src.io.files import read_text, require_file
from afpq_jax._src.errors import InputError, InputNotFoundError
from afpq_jax._src.training import losses
from afpq_jax._src.training.trainer import SCHEDULES


def build_parser() -> argparse.ArgumentParser:
    d = aq.QATConfig()
    g = aq.SelfGeneratedData()
    p = argparse.ArgumentParser(prog="python -m afpq_jax.train", description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=None, help="float model: HF directory, .gguf file, Hub id, or a built-in "
                                                 "model: smollm2-135m-instruct (the default) or gemma3-270m")
    p.add_argument("--format", default=None, help="code book (default nf3; BitDistiller's 2-bit: int2)")
    p.add_argument("--group-size", type=cli.group_size, default=cli.DEFAULT_GROUP_SIZE,
                   help="'none' = per output channel")
    p.add_argument("--sym", action="store_true", help="symmetric instead of asymmetric (AFPQ / min-max) scales")
    p.add_argument("--rules", default=None, help="JSON rules file (as for convert); replaces --format/--group-size/"
                                                 "--sym")
    p.add_argument("--loss", default=d.loss, choices=losses.LOSSES)
    p.add_argument("--gamma", type=float, default=None, help="CAKLD's gamma (default: the teacher's confidence)")
    p.add_argument("--confidence", default=d.confidence, choices=losses.CONFIDENCE_MODES,
                   help="how gamma is estimated: max_prob (BitDistiller's code) or label_prob (its paper)")
    p.add_argument("--steps", type=cli.positive_int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=cli.positive_int, default=d.batch_size, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=cli.positive_int, default=d.grad_accum,
                   help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="AdamW learning rate")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 master weights)")
    p.add_argument("--no-remat", action="store_true", help="keep every block's activations (more memory)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="perplexity on the held-out Wikipedia split every K steps (0: never); needs the built-in "
                        "calibration text (not with --calib-text / --calib-random)")
    p.add_argument("--checkpoint-dir", default=None, help="orbax training checkpoints (for --resume)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between training checkpoints in --checkpoint-dir (0: none)")
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    p.add_argument("--samples", type=cli.positive_int, default=g.samples, help="self-generated training sequences")
    p.add_argument("--prompt-len", type=cli.positive_int, default=g.prompt_len, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=cli.positive_int, default=g.new_tokens,
                   help="tokens the teacher writes per sequence")
    p.add_argument("--gen-temperature", type=float, default=g.temperature, help="teacher sampling temperature")
    p.add_argument("--prompt-file", default=None, help="UTF-8 prompts, one per line (default: calibration text)")
    p.add_argument("--data-cache", default=None, help="directory of the self-generated data cache")
    p.add_argument("--no-clip", action="store_true", help="skip the clipping init")
    p.add_argument("--calib-samples", type=cli.positive_int, default=16,
                   help="calibration windows for the clipping init")
    p.add_argument("--calib-seqlen", type=cli.positive_int, default=512)
    p.add_argument("--calib-text", default=None, help="UTF-8 calibration text (default: Wikipedia split)")
    p.add_argument("--calib-random", action="store_true",
                   help="random token ids for the clipping init and the prompts (no tokenizer needed; not with "
                        "--calib-text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="output directory (default: out/<model>-<format>-<asym|sym>-g<size|channel>-qat-<loss>, or "
                        "out/<model>-<rules file name>-qat-<loss> with --rules)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--history", default=None, help="also write the loss history (JSON lines) here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args

    def run() -> int:
        t0 = time.perf_counter()
        _check_flags(args)
        rules, suffix = cli.rules_from_args(args)
        config = aq.QATConfig(loss=args.loss, gamma=args.gamma, confidence=args.confidence, steps=args.steps,
                              batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
                              schedule=args.schedule, warmup_steps=args.warmup_steps,
                              weight_decay=args.weight_decay, compute_dtype="bfloat16" if args.bf16 else "float32",
                              remat=not args.no_remat, eval_every=args.eval_every,
                              checkpoint_every=args.checkpoint_every, seed=args.seed)
        config.validate()
        data = aq.SelfGeneratedData(samples=args.samples, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                    temperature=args.gen_temperature, seed=args.seed, prompt_file=args.prompt_file,
                                    cache_dir=args.data_cache)
        data.validate()
        if args.prompt_file is not None:
            require_file(args.prompt_file, "--prompt-file")
        if args.resume and args.checkpoint_dir is None:
            raise InputError("--resume needs --checkpoint-dir (the directory of the run to continue)")
        if args.resume and not Path(args.checkpoint_dir).is_dir():  # before the trainer creates it empty
            raise InputNotFoundError(f"nothing to resume: --checkpoint-dir {args.checkpoint_dir} does not exist; "
                                     f"pass the directory of the run to continue")
        model = args.model
        out = Path(args.out or f"out/{cli.model_name(model) if model else DEFAULT_MODEL}-{suffix}-qat-{args.loss}")
        # before hours of training: --out is checked, locked against other runs and held until the end
        with cli.claim_output(out, inputs=[model], overwrite=args.overwrite) as claim:
            if cli.builtin_model(model):
                model = cli.builtin_model_dir(model)
                claim.check_inputs([model])
            if args.checkpoint_dir is not None:  # a directory orbax manages as its own
                outputs.check_separate(args.checkpoint_dir, [model], "--checkpoint-dir")
                outputs.check_scratch(args.checkpoint_dir, [model, out], "--checkpoint-dir", may_contain=False)
            if args.data_cache is not None:
                outputs.check_scratch(args.data_cache, [model, out], "--data-cache")
            if args.history is not None:
                outputs.check_scratch(args.history, [model], "--history", kind="file")
            return _train(args, model, out, rules, config, data, t0)

    interrupted = cli.INTERRUPTED
    if args.checkpoint_dir is not None and args.checkpoint_every:
        interrupted += (f"; training checkpoints written so far stay in {args.checkpoint_dir}: the same command "
                        f"with --resume continues from the last one")
    return cli.run(run, args.debug, interrupted)


def _train(args, model: str, out: Path, rules, config: aq.QATConfig, data: aq.SelfGeneratedData, t0: float) -> int:
    """The training run itself, inside the claim on ``out``."""
    from afpq_jax import assets
    options = dict(samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
                   search_samples=min(16, args.calib_samples))
    eval_text = None
    if args.calib_random:
        calibration = aq.Calibration(random=True, **options)
    elif args.calib_text is not None:
        calibration = aq.Calibration(text=read_text(args.calib_text, "--calib-text"), **options)
    else:
        text, eval_text = assets.wiki_text()
        calibration = aq.Calibration(text=text, **options)
    eval_ids = None
    if args.eval_every and eval_text is not None:
        eval_ids = aq.tokenize(aq.load_tokenizer(model), eval_text)
    print(f"training {model}\n  -> " + ", ".join(f"{r.pattern} -> {r.scheme or 'float'}" for r in rules)
          + f"; loss={args.loss}, {args.steps} steps x {args.batch_size * args.grad_accum} sequences",
          file=sys.stderr)
    result = aq.train_qat(model, rules, config=config, data=data, calibration=calibration,
                          clip=None if args.no_clip else aq.ClipSearch(), eval_ids=eval_ids,
                          checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                          progress=not args.no_progress)
    aq.save(result.model, out, overwrite=args.overwrite)
    if args.history:
        outputs.atomic_write_text(args.history, "".join(json.dumps(h) + "\n" for h in result.history))
    print("\n".join(cli.summarize(result.model, out, time.perf_counter() - t0).lines()))
    print(f"training         : {result.steps} steps, {result.tokens:,} tokens, gamma {result.gamma:.3f}, "
          f"{loss_summary([h['loss'] for h in result.history])}, {result.seconds:.0f} s")
    return 0


def loss_summary(losses: list[float]) -> str:
    """The loss at the start and the end of a run: means of the first and last 5 steps where they do not
    overlap, single steps for shorter runs."""
    if not losses:
        return "no loss recorded"
    if len(losses) == 1:
        return f"loss {losses[0]:.4f} (1 step)"
    if len(losses) < 10:  # the 5-step means would share steps and look alike
        return f"loss {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {len(losses)})"
    return f"loss {np.mean(losses[:5]):.4f} (first 5) -> {np.mean(losses[-5:]):.4f} (last 5)"


def _check_flags(args) -> None:
    """Flag values and combinations, named by their flags (the library would name its fields, or say nothing)."""
    if args.calib_random and args.calib_text is not None:
        raise InputError("--calib-random and --calib-text both choose the calibration data; pass one of them")
    if args.eval_every and (args.calib_random or args.calib_text is not None):
        raise InputError("--eval-every scores the held-out part of the built-in Wikipedia text, which needs it as "
                         "the calibration data; drop --eval-every or --calib-text / --calib-random")
    for flag, value in (("--eval-every", args.eval_every), ("--checkpoint-every", args.checkpoint_every),
                        ("--warmup-steps", args.warmup_steps)):
        if value < 0:
            raise InputError(f"{flag} must be >= 0, got {value}")
    if args.calib_seqlen < 2:
        raise InputError(f"--calib-seqlen must be at least 2, got {args.calib_seqlen}")
    if args.gamma is not None and not 0 <= args.gamma <= 1:
        raise InputError(f"--gamma must be in [0, 1] (or omitted: estimated), got {args.gamma}")
    if not args.lr > 0:
        raise InputError(f"--lr must be > 0, got {args.lr}")
    if not args.weight_decay >= 0:
        raise InputError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not args.gen_temperature >= 0:
        raise InputError(f"--gen-temperature must be >= 0 (0 = greedy), got {args.gen_temperature}")


if __name__ == "__main__":
    sys.exit(main())
