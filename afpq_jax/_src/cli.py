"""Shared command-line plumbing: user errors as one line and exit status 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from afpq_jax._src.errors import AfpqError, InputError
from afpq_jax._src.memory import limit_malloc_arenas
from afpq_jax._src.scheme import QuantScheme, default_rules, load_rules

# Errors afpq-jax raises on purpose, and the operating system's (a full disk, a directory without write
# permission): the message is the whole story. Anything else (KeyError, TypeError, RuntimeError, ...) is a bug
# and Python's own handler prints its traceback and exits with status 1.
USER_ERRORS = (AfpqError, OSError)


INTERRUPTED = "interrupted; nothing was written to the output path"


def run(main: Callable[[], int], debug: bool, interrupted: str = INTERRUPTED) -> int:
    """``main()``'s exit status; ``interrupted`` is the line printed on Ctrl-C (what was kept, how to go on)."""
    limit_malloc_arenas()
    try:
        return main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed flags, or the exit status argparse chose (2 for a bad flag, 0 for --help): ``main([...])``
    returns a status for every outcome instead of raising SystemExit at in-process callers."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it informs: not for None (the help says what happens then), not when the
    help text already names its default, not for switches such as --sym (their default is not passing them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or "default" in help_text.lower()
                or (action.nargs == 0 and isinstance(action.default, bool))):
            return help_text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type of counts where 0 or a negative number means nothing (windows, samples, steps, sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def model_name(model: str) -> str:
    """The model's part of a default output name: a directory's own name (resolved, so '.' works), a file's stem
    (``x.gguf``), a Hub id's last part (``org/Qwen2.5-0.5B``); dots inside names are kept (Llama-3.1-8B)."""
    path = Path(model)
    if path.is_dir():
        name = path.resolve().name
    elif path.is_file() or path.suffix.lower() == ".gguf":
        name = path.stem
    else:
        name = model.rstrip("/").rpartition("/")[2]  # a Hub id org/name, or a path yet to exist
    return name or "model"


def coordinator(text: str) -> str:
    """argparse type of ``--coordinator``: 'auto' or HOST:PORT with an integer port 1..65535."""
    if text == "auto":
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (a port 1..65535, e.g. 10.0.0.1:1234) or 'auto'")
    return text


def group_size(text: str) -> int | None:
    if text.lower() in ("none", "channel", "per-channel", "-1", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'none', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'none', got {text!r}")
    return value


def byte_size(text: str) -> int:
    """``--max-memory``: bytes, or a number with K / M / G / T (powers of 1024), e.g. ``8G``."""
    t = text.strip().upper().removesuffix("B")
    scale = 1
    if t and t[-1] in "KMGT":
        scale, t = 1024 ** ("KMGT".index(t[-1]) + 1), t[:-1]
    try:
        value = float(t)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8G, 512M or 1073741824")
    return int(value * scale)


def mesh_spec(text: str) -> dict[str, int]:
    """``--mesh`` as axis sizes: ``model=4`` or ``data=2,model=4`` (argparse type; the mesh is made later)."""
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in ("data", "model") or not size.strip().isdigit() or int(size) < 1 or name in out:
            raise argparse.ArgumentTypeError(f"{text!r} is not a mesh like 'model=4' or 'data=2,model=4' (axes "
                                             f"'data' and 'model', each once, sizes >= 1)")
        out[name] = int(size)
    return out


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (one process per host, each running the same command)")
    g.add_argument("--coordinator", type=coordinator, default=None,
                   help="HOST:PORT of process 0 (jax.distributed), or 'auto' to detect the cluster (SLURM, TPU pod, "
                        "Open MPI)")
    g.add_argument("--num-processes", type=positive_int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` from the flags (before anything touches a device)."""
    if args.coordinator is None:
        if args.num_processes is not None or args.process_id is not None:
            raise InputError("--num-processes / --process-id need --coordinator HOST:PORT (or --coordinator auto)")
        return
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    if args.coordinator == "auto":
        try:
            jax.distributed.initialize()
        except ValueError as e:  # jax found no cluster environment to read the coordinator from
            raise InputError("--coordinator auto found no cluster (SLURM, TPU pod, Open MPI); pass --coordinator "
                             "HOST:PORT --num-processes N --process-id I") from e
        return
    if args.num_processes is None or args.process_id is None:
        raise InputError("--coordinator HOST:PORT needs --num-processes and --process-id")
    if not 0 <= args.process_id < args.num_processes:
        raise InputError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def make_mesh(sizes: dict[str, int]):
    """The device mesh for ``--mesh`` sizes; their product must be the number of devices."""
    import jax
    n = 1
    for v in sizes.values():
        n *= v
    if n != jax.device_count():
        raise InputError(f"--mesh {','.join(f'{k}={v}' for k, v in sizes.items())} needs {n} devices, "
                         f"{jax.device_count()} are visible; make the sizes multiply to {jax.device_count()}")
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes))  # load / quantize_pretrained make its axes Auto


def rules_from_args(args) -> tuple[list, str]:
    """(rules, default output-name suffix) from --rules or --format/--group-size/--sym and, where the command has
    them, --quantize-lm-head / --integer-scales / --scale-dtype."""
    lm_head = getattr(args, "quantize_lm_head", False)
    integer_scales = getattr(args, "integer_scales", False)
    if args.rules is not None:
        explicit = [f for f, on in (("--format", args.format is not None), ("--group-size", args.group_size != 128),
                                    ("--sym", args.sym), ("--quantize-lm-head", lm_head),
                                    ("--integer-scales", integer_scales)) if on]
        if explicit:
            raise InputError(f"--rules replaces {', '.join(explicit)}; put the scheme(s) in the rules file")
        return load_rules(args.rules), Path(args.rules).stem
    scheme = QuantScheme.create(args.format or "nf3", group_size=args.group_size, asym=not args.sym,
                                scale_dtype=getattr(args, "scale_dtype", "float16"), integer_scales=integer_scales)
    suffix = (f"{scheme.format}-{'sym' if args.sym else 'asym'}-"
              f"{'gchannel' if args.group_size is None else f'g{args.group_size}'}"
              f"{'-intscales' if integer_scales else ''}")
    return default_rules(scheme, quantize_lm_head=lm_head), suffix
