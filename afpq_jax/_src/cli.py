"""Shared command-line plumbing: user errors as one line and exit status 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from afpq_jax._src import interrupts
from afpq_jax._src.errors import AfpqError, InputError, OutputError
from afpq_jax._src.io import outputs
from afpq_jax._src.memory import limit_malloc_arenas
from afpq_jax._src.scheme import PRESETS, QuantScheme, default_rules, load_rules

# Errors afpq-jax raises on purpose, and the operating system's (a full disk, a directory without write
# permission): the message is the whole story. Anything else (KeyError, TypeError, RuntimeError, ...) is a bug
# and Python's own handler prints its traceback and exits with status 1.
USER_ERRORS = (AfpqError, OSError)


INTERRUPTED = "interrupted; nothing was written to the output path"


def run(main: Callable[[], int], debug: bool, interrupted: str | Callable[[], str] = INTERRUPTED) -> int:
    """``main()``'s exit status. Ctrl-C and SIGTERM stop the run the same way anywhere in it
    (`interrupts.stop_on_signals`): every cleanup runs, then ``interrupted`` (a line, or a function giving it:
    what was kept, how to go on) is printed and the status is 128 + the signal's number."""
    limit_malloc_arenas()
    try:
        with interrupts.stop_on_signals():
            return main()
    except BaseException as e:
        stop = interrupts.stopped_by(e)
        if stop is not None:
            print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
            return 128 + getattr(stop, "signum", 2)
        if debug or not isinstance(e, USER_ERRORS):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2


def error_line(e: BaseException) -> str:
    """The one line a user error prints as: its message's first line (the operating system's errors with the
    path they concern; a full disk with what to do)."""
    if isinstance(e, OSError) and not isinstance(e, AfpqError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {e.filename or 'an output'}; free some space or write elsewhere"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def builtin_model(model: str | None) -> bool:
    """Whether ``--model`` names a built-in model: absent (SmolLM2-135M-Instruct) or a name of
    `assets.BUILTIN_MODELS` that is not also an existing path (a user's directory of that name wins)."""
    from afpq_jax._src.assets import BUILTIN_MODELS
    return model is None or (model in BUILTIN_MODELS and not Path(model).exists())


def builtin_model_dir(model: str | None) -> str:
    """The Hugging Face directory of built-in model ``model`` (`builtin_model`), fetched and converted on first
    use."""
    from afpq_jax._src.assets import BUILTIN_MODELS, DEFAULT_MODEL
    return str(BUILTIN_MODELS[model or DEFAULT_MODEL]())


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


class _DefaultGroupSize(int):
    """--group-size's default (128), told apart from an explicit ``--group-size 128`` (a preset fixes its own)."""


DEFAULT_GROUP_SIZE = _DefaultGroupSize(128)


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
    g.add_argument("--coordinator-timeout", type=positive_int, default=300,
                   help="seconds to wait for every process to join before giving up")


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` from the flags (before anything touches a device). It says what it waits for
    and gives up after ``--coordinator-timeout`` seconds with one line and status 2: left to itself, a missing
    peer means minutes of silence and then a C++ abort with a stack trace."""
    if args.coordinator is None:
        if args.num_processes is not None or args.process_id is not None:
            raise InputError("--num-processes / --process-id need --coordinator HOST:PORT (or --coordinator auto)")
        return
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices across processes
    timeout = args.coordinator_timeout
    if args.coordinator == "auto":
        options: dict = {}
        waiting = "the processes of this cluster job"
    else:
        if args.num_processes is None or args.process_id is None:
            raise InputError("--coordinator HOST:PORT needs --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            raise InputError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
        options = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                       process_id=args.process_id)
        waiting = (f"all {args.num_processes} processes at {args.coordinator} (this is process {args.process_id})")
    print(f"waiting for {waiting}, up to {timeout} s (--coordinator-timeout)", file=sys.stderr, flush=True)
    joined = threading.Event()
    if args.coordinator == "auto":
        fix = "check that every task of the job started"
    else:
        fix = (f"start the missing ones (the same command with each --process-id), check that {args.coordinator} "
               f"is reachable from every host")

    def give_up() -> None:
        if not joined.wait(timeout):
            print(f"error: not every process joined within {timeout} s; {fix}, or raise --coordinator-timeout",
                  file=sys.stderr, flush=True)
            os._exit(2)  # jax's own timeout aborts the process from C++; nothing has been written yet

    threading.Thread(target=give_up, name="afpq-coordinator-timeout", daemon=True).start()
    try:
        with interrupts.killable():  # Ctrl-C / SIGTERM end the wait at once (our handlers are back afterwards)
            jax.distributed.initialize(initialization_timeout=timeout + 60, **options)
    except ValueError as e:  # jax found no cluster environment to read the coordinator from
        if args.coordinator != "auto":
            raise
        raise InputError("--coordinator auto found no cluster (SLURM, TPU pod, Open MPI); pass --coordinator "
                         "HOST:PORT --num-processes N --process-id I") from e
    finally:
        joined.set()


@contextlib.contextmanager
def claim_output(out: Path, inputs, overwrite: bool) -> Iterator[outputs.Claim]:
    """`outputs.claim` of ``--out`` for a command: on every process of a multi-process run, which all fail alike
    when the lead process (the only one that locks and sweeps) cannot claim it."""
    import jax
    if jax.process_count() == 1:
        with outputs.claim(out, inputs=inputs, overwrite=overwrite, what="--out", hint="--overwrite") as c:
            yield c
        return
    from jax.experimental import multihost_utils
    with contextlib.ExitStack() as stack:
        failure: AfpqError | None = None
        try:
            c = stack.enter_context(outputs.claim(out, inputs=inputs, overwrite=overwrite, what="--out",
                                                  hint="--overwrite", lead=is_lead()))
        except AfpqError as e:
            failure = e
        text = np.zeros(1024, np.uint8)
        if failure is not None:
            raw = str(failure).encode()[:1024]
            text[:len(raw)] = np.frombuffer(raw, np.uint8)
        lead = bytes(np.asarray(multihost_utils.broadcast_one_to_all(text))).rstrip(b"\0").decode(errors="replace")
        if failure is not None:
            raise failure
        if lead:
            raise OutputError(lead)
        yield c


def is_lead() -> bool:
    """Whether this is the process that writes shared outputs (process 0; the only one outside multi-process
    runs)."""
    import jax
    return jax.process_index() == 0


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
        explicit = [f for f, on in (("--format", args.format is not None),
                                    ("--group-size", not isinstance(args.group_size, _DefaultGroupSize)),
                                    ("--sym", args.sym), ("--quantize-lm-head", lm_head),
                                    ("--integer-scales", integer_scales)) if on]
        if explicit:
            raise InputError(f"--rules replaces {', '.join(explicit)}; put the scheme(s) in the rules file")
        return load_rules(args.rules), Path(args.rules).stem
    fmt = args.format or "nf3"
    scale_dtype = getattr(args, "scale_dtype", None)
    side = "sym" if args.sym else "asym"
    if fmt in PRESETS:
        clash = [f for f, on in (("--group-size", not isinstance(args.group_size, _DefaultGroupSize)),
                                 ("--scale-dtype", scale_dtype is not None), ("--integer-scales", integer_scales))
                 if on]
        if clash:
            p = PRESETS[fmt]
            raise InputError(f"--format {fmt} fixes groups of {p['group_size']} and {p['scale_dtype']} scales; drop "
                             f"{', '.join(clash)}, or spell the layout out (--format {p['format']} --group-size N "
                             f"--scale-dtype D)")
        return default_rules(QuantScheme.preset(fmt, asym=not args.sym), quantize_lm_head=lm_head), f"{fmt}-{side}"
    scheme = QuantScheme.create(fmt, group_size=args.group_size, asym=not args.sym,
                                scale_dtype=scale_dtype or "float16", integer_scales=integer_scales)
    suffix = (f"{scheme.format}-{side}-"
              f"{'gchannel' if args.group_size is None else f'g{args.group_size}'}"
              f"{'-intscales' if integer_scales else ''}")
    return default_rules(scheme, quantize_lm_head=lm_head), suffix


# ---- the conversion summary ---------------------------------------------------------------------------------

@dataclasses.dataclass
class ConvertSummary:
    """What a conversion produced (printed by the CLI)."""

    out: Path
    layers: int
    quantized_params: int
    quantized_bytes: int
    float_params: int
    disk_bytes: int
    seconds: float
    phase_seconds: dict = dataclasses.field(default_factory=dict)
    activation_modes: dict = dataclasses.field(default_factory=dict)  # {"int8 static": n layers, ...}
    folds: dict = dataclasses.field(default_factory=dict)  # {"lae": n layers, ...}

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(1, self.quantized_params)

    def lines(self) -> list[str]:
        return [f"quantized layers : {self.layers}",
                f"quantized params : {self.quantized_params:,} at {self.bits_per_weight:.3f} bits/weight "
                f"({self.quantized_bytes / 2**20:.1f} MiB)",
                f"float params     : {self.float_params:,} (embeddings, norms, biases, unquantized heads)",
                f"size on disk     : {self.disk_bytes / 2**20:.1f} MiB  ->  {self.out}",
                f"time             : {self.seconds:.1f} s"] + (
                    ["activations      : " + ", ".join(f"{k} {v}" for k, v in self.activation_modes.items())
                     + ("" if not self.folds else " (folded: " + ", ".join(f"{k} {v}" for k, v in
                                                                           self.folds.items()) + ")")]
                    if self.activation_modes else []) + (
                    ["  " + ", ".join(f"{k} {v:.1f}s" for k, v in self.phase_seconds.items())]
                    if self.phase_seconds else [])


def summarize(model, out: str | os.PathLike, seconds: float) -> ConvertSummary:
    """What a conversion or QAT run wrote to ``out`` (``model`` is the quantized `CausalLM`)."""
    import jax
    from flax import nnx

    q = [m for m in model.linear_layers().values() if m.is_quantized]
    out = Path(out)
    info = model.checkpoint_info
    q_params, q_bytes = model.quantized_size()
    return ConvertSummary(
        out=out.absolute(), layers=len(q), quantized_params=q_params, quantized_bytes=q_bytes,
        float_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
        disk_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()), seconds=seconds,
        phase_seconds=dict(info.phase_seconds) if info else {},
        activation_modes=_count(f"int{m.scheme.act_bits} {m.scheme.act_mode}" for m in q
                                if m.scheme.quantizes_activations),
        folds=_count(d["fold"] for facts in _report(info).values() for d in facts.get("activations", {}).values()
                     if d.get("fold")))


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return dict(sorted(out.items()))


def _report(info) -> dict:
    if info is None or not info.quantization:
        return {}
    return json.loads(info.quantization).get("report") or {}


