"""Host-memory hygiene for long conversions (glibc only; a no-op elsewhere).

XLA's CPU runtime allocates from many threads; glibc gives each contending thread its own malloc arena and keeps
freed pages in them, so a block-by-block run that compiles a few programs and allocates large temporaries per
block holds 100-150 MB more resident memory than it uses (measured on SmolLM2 GPTQ: 8 arenas vs 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from collections.abc import Iterator

_M_ARENA_MAX = -8  # mallopt parameter number from glibc's malloc.h


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc)
        return libc
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas for this process (arenas that already exist stay). Called by the CLIs before
    any work; library users can call it, or set ``MALLOC_ARENA_MAX``, themselves."""
    if (libc := _libc()) is not None:
        libc.mallopt(_M_ARENA_MAX, int(arenas))


def trim_heap() -> None:
    """Hands freed heap pages back to the OS (glibc keeps them otherwise; a later phase's peak would sit on top of
    an earlier phase's freed temporaries)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Collects reference cycles (NNX modules form them, and they hold device arrays: measured 140 MB after three
    SmolLM2 blocks), then `trim_heap`. Inside `old_objects_frozen` only the objects made since are scanned."""
    gc.collect()
    trim_heap()


@contextlib.contextmanager
def old_objects_frozen() -> Iterator[None]:
    """For a loop that calls `release_freed_memory` once per step: the objects alive on entry (the imported
    libraries, the caller's data) are moved out of the collector's reach until exit, so each collection scans
    only what the loop made (SmolLM2's 30 blocks: 157 ms -> a few ms per collection, 4.7 s of a 19 s
    conversion). Garbage is collected first, so nothing collectable is frozen; exit returns the frozen objects
    to the collector (also when the loop fails)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
