"""Shared command-line plumbing: one-line errors and a non-zero exit, tracebacks only with --debug."""

from __future__ import annotations

import sys
from collections.abc import Callable

from afpq_jax._src.io.sources import CheckpointError
from afpq_jax._src.memory import limit_malloc_arenas

USER_ERRORS = (CheckpointError, ValueError, TypeError, FileExistsError, FileNotFoundError, KeyError, RuntimeError,
               OSError)


def run(main: Callable[[], int], debug: bool) -> int:
    limit_malloc_arenas()
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output path", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
