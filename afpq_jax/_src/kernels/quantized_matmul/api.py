"""`quantized_matmul`: the op, its implementation registry and the dispatch rules.

Dispatch (``implementation=None``): the candidates for the default backend are tried in order and the first
whose ``supports`` accepts the call runs:

    tpu: mosaic_tpu -> xla
    gpu: triton -> mosaic_gpu (both M < 128) -> xla
    cpu: cpu (C++ via the XLA FFI; float32 or bfloat16 x, M <= 256) -> xla
    anything else: xla

Up to 256 rows of x the C++ kernel reads the codes once and never holds the float weight; beyond that,
dequantizing once and one dot ("xla") is faster on the measured CPU (BUILD_NOTES, "CPU path"). On GPU the same
holds from 128 rows on (measured on an H200: `base.GPU_PREFILL_M`). "xla_scan" (a scan over
K chunks in plain XLA) runs only when named: it measured no faster than "xla" once both ran in one jitted loop.

A candidate that declines logs one WARNING line per (implementation, reason) on the ``afpq_jax.kernels`` logger
(once per process) and the next one is tried; "xla" supports everything. An explicitly named implementation never
falls back: it raises ``NotImplementedError`` with the reason instead. Every implementation is differentiable:
a kernel's derivatives are those of the "xla" path (`base.with_reference_derivatives`). ``interpret=True`` runs a
Pallas kernel in interpret mode (any backend, e.g. CPU tests).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Protocol

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src.qtensor import QuantizedTensor
from afpq_jax._src.kernels.quantized_matmul import base, tuning
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem

logger = logging.getLogger("afpq_jax.kernels")

X_DTYPES = ("bfloat16", "float16", "float32")


class Implementation(Protocol):
    name: str
    backend: str  # "tpu" | "gpu" | "any"

    def supports(self, prob: Problem, config: BlockConfig) -> str | None:
        """None if this implementation handles ``prob`` with ``config``, else a one-line reason."""

    def __call__(self, x2d: jax.Array, qt: QuantizedTensor, prob: Problem, config: BlockConfig, *,
                 interpret: bool) -> jax.Array:
        """(M, K) -> (M, N) in x's dtype."""

    # Optional: ``preferred(prob) -> str | None``, a size rule dispatch applies before `supports` (None: take
    # it). A supported but slower shape is skipped without a warning; an explicit call still runs it.


@dataclasses.dataclass(frozen=True)
class _Xla:
    name: str = "xla"
    backend: str = "any"

    def supports(self, prob, config):
        return None

    def __call__(self, x2d, qt, prob, config, *, interpret=False):
        from afpq_jax._src.kernels.quantized_matmul.xla import quantized_matmul_xla
        return quantized_matmul_xla(x2d, qt)


@dataclasses.dataclass(frozen=True)
class _XlaScan:
    """`xla_scan`: a plain-XLA scan over K chunks, never the whole float weight at once (explicit only)."""

    name: str = "xla_scan"
    backend: str = "cpu"

    def supports(self, prob, config):
        from afpq_jax._src.kernels.quantized_matmul import xla_scan
        return xla_scan.why_unsupported(prob, config.block_k)

    def __call__(self, x2d, qt, prob, config, *, interpret=False):
        from afpq_jax._src.kernels.quantized_matmul import xla_scan
        return xla_scan.quantized_matmul_scan(x2d, qt, prob, config.block_k)


@dataclasses.dataclass(frozen=True)
class _Cpu:
    """The C++ CPU kernel (`cpu`), built on first use; declines when it cannot be built."""

    name: str = "cpu"
    backend: str = "cpu"

    def supports(self, prob, config):
        from afpq_jax._src.kernels.quantized_matmul import cpu
        return cpu.why_unsupported(prob)

    def preferred(self, prob):
        from afpq_jax._src.kernels.quantized_matmul import cpu
        return cpu.why_not_preferred(prob)

    def __call__(self, x2d, qt, prob, config, *, interpret=False):
        from afpq_jax._src.kernels.quantized_matmul import cpu
        return cpu.quantized_matmul_cpu(x2d, qt, prob)


IMPLEMENTATIONS: dict[str, Implementation] = {}

DISPATCH_ORDER: dict[str, tuple[str, ...]] = {
    "tpu": ("mosaic_tpu", "xla"),
    "gpu": ("triton", "mosaic_gpu", "xla"),
    "cpu": ("cpu", "xla"),
}


def register_implementation(impl: Implementation, *, replace: bool = False) -> Implementation:
    if impl.name in IMPLEMENTATIONS and not replace:
        raise ValueError(f"quantized_matmul implementation {impl.name!r} is already registered")
    IMPLEMENTATIONS[impl.name] = impl
    return impl


@dataclasses.dataclass(frozen=True)
class _Deferred:
    """A built-in Pallas implementation whose module is imported on first use. Importing the Pallas backends
    (Mosaic TPU, Triton, Mosaic GPU) costs ~0.5 s and ~35 MB resident, which CPU runs (dispatch: xla only)
    never need."""

    name: str
    backend: str
    module: str
    cls: str

    def _impl(self) -> Implementation:
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.cls)()

    def supports(self, prob, config):
        return self._impl().supports(prob, config)

    def preferred(self, prob):
        rule = getattr(self._impl(), "preferred", None)
        return None if rule is None else rule(prob)

    def __call__(self, x2d, qt, prob, config, *, interpret=False):
        return self._impl()(x2d, qt, prob, config, interpret=interpret)


def _register_builtins() -> None:
    register_implementation(_Xla())
    register_implementation(_XlaScan())
    register_implementation(_Cpu())
    register_implementation(_Deferred("mosaic_tpu", "tpu", "mosaic_tpu", "MosaicTpu"))
    register_implementation(_Deferred("triton", "gpu", "triton", "Triton"))
    register_implementation(_Deferred("mosaic_gpu", "gpu", "mosaic_gpu", "MosaicGpu"))


def current_backend() -> str:
    b = jax.default_backend()
    return "gpu" if b in ("gpu", "cuda", "rocm") else b


_LOGGED: set[tuple[str, str]] = set()


def _log_once(name: str, reason: str, prob: Problem, nxt: str) -> None:
    key = (name, reason)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    logger.warning("quantized_matmul: %s declined %s-%s g=%s M=%d K=%d N=%d x=%s (%s); using %s", name,
                   prob.format_name, "asym" if prob.asym else "sym", "channel" if prob.per_channel else prob.group,
                   prob.m, prob.k, prob.n, prob.x_dtype, reason, nxt)


def resolve_tuned(name: str, prob: Problem, config: BlockConfig | None) -> BlockConfig:
    """``config`` over the measured tiling for this shape on this device (`tuning`), over the defaults; the
    measured tiling is dropped if the implementation declines it."""
    measured = tuning.tuned(name, prob)
    if measured is not None:
        cfg = base.resolve(name, prob, base.merge(config, measured))
        if IMPLEMENTATIONS[name].supports(prob, cfg) is None:
            return cfg
    return base.resolve(name, prob, config)


def select_implementation(prob: Problem, config: BlockConfig | None = None, backend: str | None = None,
                          *, log: bool = True) -> tuple[str, BlockConfig]:
    """The implementation (and resolved config) that ``implementation=None`` would run."""
    backend = backend or current_backend()
    order = DISPATCH_ORDER.get(backend, ("xla",))
    for i, name in enumerate(order):
        impl = IMPLEMENTATIONS[name]
        preferred = getattr(impl, "preferred", None)
        if preferred is not None and preferred(prob) is not None:
            continue
        cfg = resolve_tuned(name, prob, config)
        reason = impl.supports(prob, cfg)
        if reason is None:
            return name, cfg
        if log:
            _log_once(name, reason, prob, order[i + 1] if i + 1 < len(order) else "nothing")
    raise AssertionError("xla must support every case")  # pragma: no cover


def why_not(implementation: str, x, qt: QuantizedTensor, config: BlockConfig | None = None) -> str | None:
    """None if ``implementation`` supports ``x @ qt`` (x may be a ShapeDtypeStruct), else the reason: shapes,
    dtypes and tiling. A Pallas kernel also compiles only for its own platform (TPU or GPU; also from another host,
    for ahead-of-time lowering) or with ``interpret=True``; that is not checked here."""
    if implementation not in IMPLEMENTATIONS:
        raise InputError(f"unknown implementation {implementation!r}; registered: {sorted(IMPLEMENTATIONS)}")
    prob = Problem.create(x.shape, x.dtype, qt.with_float_scales())
    return IMPLEMENTATIONS[implementation].supports(prob, resolve_tuned(implementation, prob, config))


def quantized_matmul(x: jax.Array, qt: QuantizedTensor, *, implementation: str | None = None,
                     config: BlockConfig | None = None, interpret: bool = False) -> jax.Array:
    """``x @ dequantize(qt)`` for ``x`` of shape (..., K) in bfloat16 / float16 / float32; result (..., N) in
    x's dtype, accumulated in float32.

    Numerics (every implementation): the weight tile is dequantized to float32 exactly as
    `afpq_jax.dequantize` does, rounded to x's dtype, and contracted with float32 accumulation (float32 x:
    full-precision dot). Only the summation order differs between implementations.

    implementation: None (dispatch, see the module doc), or a name in `IMPLEMENTATIONS`
        ("xla", "xla_scan", "cpu", "mosaic_tpu", "triton", "mosaic_gpu").
    config: a `BlockConfig`; unset fields take the measured tiling for this shape and device (`tuning`) if
        there is one, else the implementation's defaults.
    interpret: run Pallas kernels in interpret mode (CPU testing).
    """
    if not isinstance(qt, QuantizedTensor):
        raise ArgumentTypeError(f"quantized_matmul expects a QuantizedTensor, got {type(qt).__name__}")
    x = x if hasattr(x, "dtype") else jnp.asarray(x)
    if jnp.dtype(x.dtype).name not in X_DTYPES:
        raise ArgumentTypeError(f"x must be one of {X_DTYPES}, got {jnp.dtype(x.dtype).name}")
    qt = qt.with_float_scales()  # integer group scales pay off on the int8 path; here they are float32 scales
    prob = Problem.create(x.shape, x.dtype, qt)
    if implementation is None:
        name, cfg = select_implementation(prob, config)
    else:
        if implementation not in IMPLEMENTATIONS:
            raise InputError(f"unknown implementation {implementation!r}; registered: {sorted(IMPLEMENTATIONS)}")
        name = implementation
        cfg = resolve_tuned(name, prob, config)
        reason = IMPLEMENTATIONS[name].supports(prob, cfg)
        if reason is not None:
            raise NotImplementedError(f"quantized_matmul[{name}] does not support this call: {reason}")
    if name == "xla":
        return _Xla()(x, qt, prob, cfg)
    if prob.m == 0:
        return jnp.zeros((*x.shape[:-1], prob.n), x.dtype)
    from afpq_jax._src.kernels.quantized_matmul.xla import quantized_matmul_xla

    def kernel(x2d, q):
        return IMPLEMENTATIONS[name](x2d, q, prob, cfg, interpret=interpret)

    y = base.with_reference_derivatives(kernel, quantized_matmul_xla)(x.reshape(prob.m, prob.k), qt)
    return y.reshape(*x.shape[:-1], prob.n)


_register_builtins()

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "Implementation", "quantized_matmul", "register_implementation",
           "select_implementation", "why_not"]

