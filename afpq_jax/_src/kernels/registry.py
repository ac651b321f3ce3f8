"""The implementation registry every kernel op uses (tokamax's habit): implementations by name, the order
dispatch tries them per backend, each backend's default tilings, and the one-line log of a declined call.

An implementation is an object with ``name``, ``backend`` ("tpu" | "gpu" | "cpu" | "any"), ``supports(prob,
config) -> reason | None`` and a call whose signature is the op's own. Optional: ``default_config(prob, config)``
(its tiling rules, given the caller's partial config; absent: no tiling) and ``preferred(prob) -> reason |
None`` (a size rule dispatch applies before ``supports``; an explicit call ignores it). Built-in Pallas kernels
are registered as `Deferred`: their module is imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from typing import Any

import jax

from afpq_jax._src.errors import InputError

logger = logging.getLogger("afpq_jax.kernels")


def current_backend() -> str:
    """The default backend's family: "tpu", "gpu" (CUDA or ROCm), "cpu", ..."""
    b = jax.default_backend()
    return "gpu" if b in ("gpu", "cuda", "rocm") else b


@dataclasses.dataclass(frozen=True)
class Deferred:
    """An implementation whose module is imported on first use. Importing the Pallas backends (Mosaic TPU,
    Triton, Mosaic GPU) costs ~0.5 s and ~35 MB resident, which CPU runs (dispatch: xla only) never need."""

    name: str
    backend: str
    module: str  # absolute module path
    cls: str

    def _impl(self) -> Any:
        return getattr(importlib.import_module(self.module), self.cls)()

    def supports(self, prob, config):
        return self._impl().supports(prob, config)

    def preferred(self, prob):
        rule = getattr(self._impl(), "preferred", None)
        return None if rule is None else rule(prob)

    def default_config(self, prob, config=None):
        rule = getattr(self._impl(), "default_config", None)
        return None if rule is None else rule(prob, config)

    def launch(self, prob, config):
        """The implementation's launch summary (programs, shared memory) where it reports one, else None."""
        rule = getattr(self._impl(), "launch", None)
        return None if rule is None else rule(prob, config)

    def __call__(self, *args, **kwargs):
        return self._impl()(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Reference:
    """An op's XLA reference as its "xla" implementation: supports every call, runs ``fn`` on the op's call
    arguments before (prob, config)."""

    fn: Callable
    name: str = "xla"
    backend: str = "any"

    def supports(self, prob, config):
        return None

    def __call__(self, *args, interpret: bool = False):
        return self.fn(*args[:-2])


class Registry:
    """One op's implementations (``implementations``: name -> implementation) and ``dispatch_order`` (backend ->
    names, tried in order; the last must support everything)."""

    def __init__(self, op: str, dispatch_order: dict[str, tuple[str, ...]]):
        self.op = op
        self.implementations: dict[str, Any] = {}
        self.dispatch_order = dispatch_order
        self._logged: set[tuple[str, str]] = set()

    def register(self, impl: Any, *, replace: bool = False) -> Any:
        """Adds ``impl`` under ``impl.name`` (usable as a decorator on an instance's factory result)."""
        if impl.name in self.implementations and not replace:
            raise ValueError(f"{self.op} implementation {impl.name!r} is already registered")
        self.implementations[impl.name] = impl
        return impl

    def get(self, name: str) -> Any:
        if name not in self.implementations:
            raise InputError(f"unknown implementation {name!r}; registered: {sorted(self.implementations)}")
        return self.implementations[name]

    def candidates(self, backend: str) -> tuple[str, ...]:
        return self.dispatch_order.get(backend, ("xla",))

    def default_config(self, name: str, prob, config=None):
        """``name``'s default tiling for ``prob`` (None: it has no tiling rules)."""
        rule = getattr(self.get(name), "default_config", None)
        return None if rule is None else rule(prob, config)

    def select(self, prob, backend: str, resolve: Callable[[str], Any], describe: Callable[[], str], *,
               log: bool = True) -> tuple[str, Any]:
        """(name, config) of the first candidate for ``backend`` whose size rule (``preferred``) does not skip it
        and whose ``supports`` accepts ``prob`` with ``resolve(name)`` (its resolved config); each decline is
        logged once (`declined`)."""
        order = self.candidates(backend)
        for i, name in enumerate(order):
            impl = self.implementations[name]
            rule = getattr(impl, "preferred", None)
            if rule is not None and rule(prob) is not None:
                continue  # supported but slower at this size: skipped without a warning
            cfg = resolve(name)
            reason = impl.supports(prob, cfg)
            if reason is None:
                return name, cfg
            if log:
                self.declined(name, reason, describe, order[i + 1] if i + 1 < len(order) else "nothing")
        raise AssertionError(f"{self.op}: the last candidate of {order} must support every call")  # pragma: no cover

    def log_declines_again(self) -> None:
        """Forgets which declines were logged (tests and benchmarks that check the log)."""
        self._logged.clear()

    def declined(self, name: str, reason: str, describe: Callable[[], str], nxt: str) -> None:
        """Logs one WARNING per (implementation, reason) and process: dispatch moved on to ``nxt``."""
        if (name, reason) in self._logged:
            return
        self._logged.add((name, reason))
        logger.warning("%s: %s declined %s (%s); using %s", self.op, name, describe(), reason, nxt)
