"""Shared command-line plumbing: user errors as one line and exit status 2; bugs keep their traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from afpq_jax._src.errors import AfpqError
from afpq_jax._src.memory import limit_malloc_arenas

# Errors afpq-jax raises on purpose, and the operating system's (a full disk, a directory without write
# permission): the message is the whole story. Anything else (KeyError, TypeError, RuntimeError, ...) is a bug
# and Python's own handler prints its traceback and exits with status 1.
USER_ERRORS = (AfpqError, OSError)


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
