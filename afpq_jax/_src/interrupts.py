"""Ctrl-C and SIGTERM: one behaviour for a whole run, and sections a signal must not cut in half.

`stop_on_signals` (the command-line tools wrap their whole run in it): SIGINT and SIGTERM raise `Interrupted`
(a `KeyboardInterrupt`) in the main thread, so every ``finally`` and context manager cleans up — staging
directories, spill files, locks. SIGTERM's default action would kill the process with all of them on disk
(``timeout``, SLURM and Kubernetes send SIGTERM).

`deferred` marks a section that must finish once started: orbax's checkpoint write (its background threads
would recreate a staging directory deleted under them, and print pages of tracebacks) and the removal of staging
files. A signal that arrives inside is held and delivered, to whatever handler was installed before, as the
outermost section ends. Both work only in the main thread (Python delivers signals there); elsewhere they do
nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``signum`` says which (exit status 128 + signum, as shells report it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held: list[int] = []
_depth = 0
_redeliveries: list[threading.Timer] = []
_scopes = 0  # nested `stop_on_signals` blocks


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _swallowing(frame) -> bool:
    """Whether the interrupted code runs where Python swallows exceptions ("Exception ignored in ..."): a garbage
    collector callback (JAX's runs often) or a ``__del__``. An `Interrupted` raised there would be lost and the
    run would go on to the end."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _raise(signum, frame) -> None:
    if _swallowing(frame):  # deliver it again a moment later, outside the callback
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        _redeliveries.append(timer)
        timer.start()
        return
    raise Interrupted(signum)


def _is_default(signum: int, handler) -> bool:
    return handler is signal.SIG_DFL or (signum == signal.SIGINT and handler is signal.default_int_handler)


def _hold(signum, frame) -> None:
    _held.append(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while the block runs (restored afterwards). Only signals left at
    their default action are taken over: an ignored one (``cmd &`` in a script ignores SIGINT) stays ignored and
    an application's own handler stays in charge. Not inside a `deferred` section."""
    global _scopes
    if not _main_thread() or _depth:
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in previous.items():
        if _is_default(s, handler):
            signal.signal(s, _raise)
    _scopes += 1
    try:
        yield
    finally:
        _scopes -= 1
        if not _scopes:  # a re-delivery still pending belongs to the run, which is over
            for timer in _redeliveries:
                timer.cancel()
            _redeliveries.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def killable() -> Iterator[None]:
    """For a block that waits inside C++ (``jax.distributed.initialize``), where no Python handler can run until it
    returns: SIGINT and SIGTERM get their default action (the process ends at once; nothing is written yet).
    Afterwards the handlers in force before are put back, also over any the block installed (jax installs a
    SIGTERM handler of its own, a preemption notifier, which would make SIGTERM do nothing)."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, signal.SIG_DFL)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Holds SIGINT / SIGTERM until the block ends, then delivers the first one that arrived."""
    global _depth
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, _hold) for s in SIGNALS} if _depth == 0 else {}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if _held:
                signum = _held[0]
                _held.clear()
                signal.raise_signal(signum)  # runs the restored handler (e.g. raises KeyboardInterrupt)


def stopped_by(exc: BaseException) -> KeyboardInterrupt | None:
    """The `KeyboardInterrupt` that ``exc`` is, or that caused it: a signal landing inside a C extension's import
    surfaces as ``ImportError: initialization failed`` caused by it, and libraries wrap it in their own errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
