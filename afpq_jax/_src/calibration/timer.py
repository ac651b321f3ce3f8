"""Wall time per phase of a conversion (reported in the summary, never stored in a checkpoint)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator


class PhaseTimer:
    """Accumulates wall time per phase: ``with timer("gptq"): ...``. Callers wait for their results inside the
    ``with`` (``jax.block_until_ready``) so asynchronous work lands in its own phase.

    Pass a subclass to `afpq_jax.quantize_pretrained` (``timer=``) to observe a conversion: wrap `__call__` to see
    phases begin and end, override `block_done` to act after each block (called once its memory is released).
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def block_done(self, index: int) -> None:
        """Called after block ``index`` is placed and its temporaries are freed."""

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.seconds.items()}
