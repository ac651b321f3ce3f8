"""Where afpq-jax writes: output paths checked before any work, files written whole, directories published by
one rename that never replaces another run's result.

Invariants (each has a test in tests/io/test_outputs.py):
  * An output never holds a user's input: `claim` refuses an output path that is, or contains, a model path,
    the working directory, the home directory or a file-system root.
  * Replacing (``overwrite``) touches only an afpq-jax output: a directory whose ``quantization_config.json``
    (a checkpoint's) or ``manifest.json`` (an export's) names an ``afpq-jax`` format, or an empty directory.
    Anything else is refused.
  * One writer per output path: `claim` holds an exclusive lock (``.<name>.lock`` beside it) from the checks to
    the end, so of two runs aimed at one path the second fails at once with one line; `publish` renames with
    "no replace" semantics, so even a writer that ignores the lock cannot be overwritten silently.
  * Staging directories ``.<name>.partial-*`` and replaced outputs ``.<name>.old-*`` are the only other names
    written beside an output; the lock holder sweeps those an interrupted run left (and puts back an output that
    an interrupted replacement had moved aside).
  * A full disk is one `NoSpaceError` line naming the path and the bytes needed, never a library traceback.

Multi-process runs on a shared file system: only the lead process (``lead=True``) locks, sweeps and renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from afpq_jax._src import interrupts
from afpq_jax._src.errors import NoSpaceError, OutputBusyError, OutputError, OutputExistsError

logger = logging.getLogger("afpq_jax")

MANIFEST = "quantization_config.json"  # a converted checkpoint's (checkpoint.QUANT_CONFIG)
# What makes a directory an afpq-jax output: one of these files, whose key names a format starting "afpq-jax"
# (a converted checkpoint's "afpq-jax/1"; afpq_jax.qwix.save_state's "afpq-jax-qwix-state-v1").
MANIFESTS = ((MANIFEST, "checkpoint_format"), ("manifest.json", "format"))
FORMAT_PREFIX = "afpq-jax"


# ---- paths ------------------------------------------------------------------------------------------------------

def real(path: str | os.PathLike) -> Path:
    """``path`` absolute with every symbolic link resolved (whether or not it exists yet). ``realpath`` alone:
    ``abspath`` would drop ``link/..`` as text, where the kernel follows the link first."""
    return Path(os.path.realpath(os.fspath(path)))


def within(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (after resolving links)."""
    p, d = real(path), real(directory)
    return p == d or d in p.parents


def is_afpq_output(path: str | os.PathLike) -> bool:
    """A directory (not a link) holding a manifest (`MANIFESTS`) that names an afpq-jax format."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    for name, key in MANIFESTS:
        try:
            manifest = json.loads((p / name).read_text())
        except (OSError, ValueError):
            continue
        fmt = manifest.get(key) if isinstance(manifest, dict) else None
        if isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX):
            return True
    return False


def _replaceable(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir():
        return is_afpq_output(path) or not any(path.iterdir())
    return False


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_separate(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str) -> None:
    """Refuses an output ``path`` that is, or contains, one of ``inputs`` (paths that do not exist, e.g. Hub ids,
    are skipped), the working directory, the home directory or a file-system root."""
    p = real(path)
    for source in inputs:
        if source is None or not os.path.lexists(os.fspath(source)):
            continue
        if within(source, p):
            relation = "is" if real(source) == p else "contains"
            raise OutputError(f"{what} {path} {relation} the input {source}; an output must be a new directory "
                              f"outside the inputs, e.g. {what} out/{p.name or 'result'}")
    for place, name in ((Path.cwd(), "the working directory"), (Path.home(), "the home directory")):
        if within(place, p):
            relation = "is" if real(place) == p else "contains"
            raise OutputError(f"{what} {path} {relation} {name}; pass a new directory, e.g. {what} out/result")
    if p.parent == p:
        raise OutputError(f"{what} {path} is a file-system root; pass a new directory, e.g. {what} out/result")


def check_scratch(path: str | os.PathLike, others: Iterable[str | os.PathLike | None], what: str, *,
                  may_contain: bool = True, kind: str = "directory") -> None:
    """Refuses a scratch path (spilled activations, training checkpoints, caches, a history file) that is or lies
    inside one of ``others`` (the model, the output) — a run killed with SIGKILL would leave gigabytes inside the
    user's model, and files inside ``--out`` would make it exist before it is published — and, unless
    ``may_contain``, one that contains them (a directory the tool manages as its own)."""
    for other in others:
        if other is None:
            continue
        if within(path, other) or (not may_contain and within(other, path)):
            raise OutputError(f"{what} {path} {'is inside' if within(path, other) else 'contains'} {other}; pass a "
                              f"{kind} outside the model and the output")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fails now, not after hours of work, if ``path`` cannot be created: its nearest existing ancestor must be a
    directory this process can create files in (a probe file is made and removed: the only reliable test on
    read-only mounts and for root)."""
    base = _existing_ancestor(Path(path).absolute().parent)
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a directory; choose another {what}")
    try:
        with interrupts.deferred():  # never leave the probe behind
            fd, probe = tempfile.mkstemp(prefix=".afpq-write-probe-", dir=base)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot create files in {base} ({e.strerror or e}); choose another "
                          f"{what} or fix the permissions") from None


# ---- a full disk --------------------------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(path: str | os.PathLike) -> int:
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def no_space(path: str | os.PathLike, needed: int | None) -> NoSpaceError:
    free = free_bytes(path)
    need = f"about {_size(needed)} needed, {_size(free)} free" if needed else f"{_size(free)} free"
    e = NoSpaceError(f"no space left on the device of {path} ({need}); free some space or write elsewhere")
    e.needed = needed
    return e


def require_space(path: str | os.PathLike, needed: int) -> None:
    """`NoSpaceError` now if the device of ``path`` has fewer than ``needed`` bytes free."""
    if free_bytes(path) < needed:
        raise no_space(path, needed)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def as_no_space(exc: BaseException, path: str | os.PathLike, needed: int | None = None) -> NoSpaceError | None:
    """A `NoSpaceError` if ``exc`` (or what caused it) is a full disk: ENOSPC / EDQUOT, or a library's message
    saying so (tensorstore under orbax: "No space left on device"), or numpy's short write ("N requested and M
    written") on a device with less than ``needed`` bytes (or 1 MiB) free; else None. (RESOURCE_EXHAUSTED alone
    is not enough: XLA says it for device memory too.)"""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return no_space(path, needed)
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return no_space(path, needed)
        if (isinstance(e, OSError) and "requested and" in text and "written" in text
                and free_bytes(path) < max(needed or 0, 2**20)):
            return no_space(path, needed)
    return None


# ---- files written whole ------------------------------------------------------------------------------------------

def tmp_sibling(path: str | os.PathLike) -> Path:
    """A unique temporary name beside ``path`` (same directory: `os.replace` onto ``path`` is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, size: int | None = None) -> None:
    """Calls ``write(tmp)`` for a temporary file beside ``path``, then renames it onto ``path``: readers see the
    old file or the whole new one, never a part. On any failure the temporary file is removed; a full disk is a
    `NoSpaceError` (``size``: the bytes being written, for the message)."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        full = as_no_space(e, path, size) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda p: p.write_bytes(data), size=len(data))


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """afpq-jax's cache (the built-in model and texts, the CPU kernel, self-generated QAT data): ``cache`` if
    given, else ``$AFPQ_CACHE``, else ``~/.cache/afpq_jax``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("AFPQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "afpq_jax"


# ---- directories published by one rename ---------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def rename_no_replace(src: Path, dst: Path, what: str = "output") -> None:
    """Renames ``src`` to ``dst`` only if ``dst`` does not exist (Linux ``renameat2(RENAME_NOREPLACE)``, atomic;
    elsewhere an existence check just before the rename); `OutputExistsError` if it does."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise OutputExistsError(f"{what} {dst} appeared while this run was writing (another program created "
                                    f"it); the result was not published — choose another {what}")
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # a file system without the flag: fall back
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise OutputExistsError(f"{what} {dst} appeared while this run was writing; the result was not published "
                                f"— choose another {what}")
    os.rename(src, dst)


def publish_shared(staging: Path, final: Path) -> None:
    """Renames a finished cache directory into place; if another process published the same content first,
    theirs is kept and ``staging`` removed (caches are written by whoever needs them first)."""
    try:
        rename_no_replace(staging, final)
    except (OutputExistsError, OSError):
        if not final.is_dir():
            raise
        remove_tree(staging)


def remove_tree(path: Path) -> None:
    """Removes a directory tree, or a file or link (never following a link)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, out: Path, *, overwrite: bool, what: str = "output directory",
            hint: str = "overwrite=True") -> None:
    """Moves the finished directory ``staging`` to ``out``. An existing ``out`` is replaced only with
    ``overwrite`` and only if it is an afpq-jax output (or empty); it is first renamed aside (``.<name>.old-*``)
    and put back if the final rename fails, so ``out`` is never lost."""
    if os.path.lexists(out):
        if not overwrite:
            raise exists_error(out, what, hint)
        if not _replaceable(out):
            raise not_ours_error(out, what, hint)
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            rename_no_replace(staging, out, what)
        except BaseException:
            with contextlib.suppress(OSError):
                rename_no_replace(old, out, what)
            raise
        # renamed before deleting: a half-deleted copy (SIGKILL mid-way) must never look like one to put back
        trash = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        os.rename(old, trash)
        remove_tree(trash)
    else:
        rename_no_replace(staging, out, what)


def exists_error(out: Path, what: str, hint: str) -> OutputExistsError:
    return OutputExistsError(f"{what} {out} already exists; choose another {what} or pass {hint}")


def not_ours_error(out: Path, what: str, hint: str) -> OutputError:
    kind = "a symbolic link" if out.is_symlink() else ("a file" if not out.is_dir() else
                                                       "a directory afpq-jax did not write")
    return OutputError(f"{what} {out} is {kind}; {hint} replaces only afpq-jax outputs (a directory with its "
                       f"{MANIFEST} or an export's manifest.json) or an empty directory — move it away yourself or "
                       f"choose another {what}")


# ---- one writer per output: the lock, the checks, the sweep -------------------------------------------------------

@dataclasses.dataclass
class Claim:
    """This process's exclusive right to write ``out`` (see `claim`)."""

    out: Path
    overwrite: bool
    what: str
    hint: str
    lead: bool
    depth: int = 1
    published: bool = False  # set once the result is at ``out`` (a later Ctrl-C must not say "nothing written")
    _fd: int | None = None
    _lock: Path | None = None
    _made: list[Path] = dataclasses.field(default_factory=list)  # parent directories this claim created

    def check_inputs(self, inputs: Iterable[str | os.PathLike | None]) -> None:
        """Refuses inputs found after the claim was made (e.g. the default model once fetched)."""
        check_separate(self.out, inputs, self.what)

    def check_target(self) -> None:
        """The output does not exist, or may be replaced (``overwrite`` and an afpq-jax output)."""
        if os.path.lexists(self.out):
            if not self.overwrite:
                raise exists_error(self.out, self.what, self.hint)
            if not _replaceable(self.out):
                raise not_ours_error(self.out, self.what, self.hint)


_CLAIMS: dict[Path, Claim] = {}


def _lock(path: Path, out: Path, what: str) -> int | None:
    """An exclusive ``flock`` on ``path``, kept while the returned descriptor is open; None where the platform has
    no flock (the no-replace rename still protects the result)."""
    try:
        import fcntl
    except ImportError:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise OutputBusyError(f"another afpq-jax run (pid {holder}) is writing {what} {out}; wait for it to "
                                  f"finish or choose another {what}") from None
        # the holder before us may have unlinked the file after we opened it: lock the file that is there now
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def _leftovers(out: Path, kind: str) -> list[Path]:
    """``.<name>.<kind>-<8 hex digits>`` beside ``out``: exactly the names `publish` and `staging` give (a
    prefix match would take another output's files, e.g. ``.a.old-1.partial-*`` of an output ``a.old-1``)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{kind}-[0-9a-f]{{8}}")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def sweep(out: Path) -> list[str]:
    """Removes what interrupted runs left beside ``out`` (staging ``.partial-*`` directories, replaced ``.old-*``
    outputs) and puts back an output that an interrupted replacement had moved aside, if it is complete. A
    replaced output is kept while ``out`` is something afpq-jax did not write. Call only while holding ``out``'s
    lock. Returns a description of each action."""
    done: list[str] = []
    if not out.parent.is_dir():
        return done
    olds = sorted(_leftovers(out, "old"), key=lambda p: p.lstat().st_mtime)
    if olds and not os.path.lexists(out) and is_afpq_output(olds[-1]):
        back = olds.pop()
        os.rename(back, out)
        done.append(f"put back {out} from {back.name} (a replacement was interrupted before it finished)")
    if olds and os.path.lexists(out) and not is_afpq_output(out):
        done.append(f"kept {', '.join(p.name for p in olds)} beside {out} (a replaced checkpoint; {out} is not "
                    f"afpq-jax's): move it back or delete it yourself")
        olds = []
    leftovers = olds + _leftovers(out, "partial")
    for p in leftovers:
        remove_tree(p)
    if leftovers:
        done.append(f"removed {len(leftovers)} leftover(s) of interrupted runs beside {out}: "
                    + ", ".join(p.name for p in leftovers))
    return done


@contextlib.contextmanager
def claim(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
          what: str = "output directory", hint: str = "overwrite=True", lead: bool = True) -> Iterator[Claim]:
    """Checks that ``out`` may be written and holds it for this process until the block ends.

    In order, before any work: ``out`` is separate from the ``inputs``, the working and home directories
    (`check_separate`); its nearest existing ancestor accepts new files (`check_writable`); the lock
    ``.<name>.lock`` is taken (`OutputBusyError` if another run holds it); leftovers of interrupted runs are swept
    (one log line each); ``out`` does not exist, or ``overwrite`` and it is an afpq-jax output. Re-entrant within
    a process: a nested claim of the same path (the CLI's, then `afpq_jax.save`'s) shares the outer one and its
    ``overwrite``/``hint``. Missing parent directories are created, and removed again if the run fails while
    they are still empty."""
    out = Path(out).absolute()
    key = real(out)
    held = _CLAIMS.get(key)
    check_separate(out, inputs, held.what if held else what)
    if held is not None:
        held.depth += 1
        try:
            yield held
        finally:
            held.depth -= 1
        return
    c = Claim(out=out, overwrite=overwrite, what=what, hint=hint, lead=lead)
    check_writable(out, what)
    ok = False
    try:
        if lead:
            missing = []
            p = out.parent
            while not p.exists():
                missing.append(p)
                p = p.parent
            for p in reversed(missing):
                try:
                    p.mkdir()
                except FileExistsError:  # another run made it first: not ours to remove
                    continue
                c._made.append(p)
            c._lock = out.parent / f".{out.name}.lock"
            c._fd = _lock(c._lock, out, what)
            for line in sweep(out):
                logger.warning("%s", line)
        c.check_target()
        _CLAIMS[key] = c
        yield c
        ok = True
    finally:
        _CLAIMS.pop(key, None)
        if c._fd is not None:
            with contextlib.suppress(OSError):
                c._lock.unlink()
            os.close(c._fd)
        if not ok:
            for p in reversed(c._made):
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if still empty
