"""`quantized_matmul`: the op, its implementation registry and the dispatch rules.

Dispatch (``implementation=None``): the candidates for the default backend are tried in order and the first
whose ``supports`` accepts the call runs:

    tpu: mosaic_tpu -> xla
    gpu: triton -> mosaic_gpu (both M < 128) -> xla
    cpu: cpu (C++ via the XLA FFI; float32 or bfloat16 x; AVX-512 / AVX2 / NEON M <= 256; the portable loop
         INT M <= 16, code books never) -> xla
    anything else: xla

Up to 256 rows of x (per path and format kind: `cpu.MAX_M`) the C++ kernel reads the codes once and never holds
the float weight; beyond that, dequantizing once and one dot ("xla") is faster on the measured CPU (BUILD_NOTES,
"CPU path"). On GPU the same
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
from typing import Protocol

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import ArgumentTypeError
from afpq_jax._src.kernels.quantized_matmul import base, tuning
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem
from afpq_jax._src.kernels.quantized_matmul.xla import quantized_matmul_xla
from afpq_jax._src.kernels.registry import Deferred, Reference, Registry, current_backend
from afpq_jax._src.qtensor import QuantizedTensor

X_DTYPES = ("bfloat16", "float16", "float32")


class Implementation(Protocol):
    name: str
    backend: str  # "tpu" | "gpu" | "cpu" | "any"

    def supports(self, prob: Problem, config: BlockConfig) -> str | None:
        """None if this implementation handles ``prob`` with ``config``, else a one-line reason."""

    def __call__(self, x2d: jax.Array, qt: QuantizedTensor, prob: Problem, config: BlockConfig, *,
                 interpret: bool) -> jax.Array:
        """(M, K) -> (M, N) in x's dtype."""

    # Optional (see `registry`): ``default_config(prob, config) -> BlockConfig``, the implementation's tiling
    # rules; ``preferred(prob) -> str | None``, a size rule dispatch applies before `supports` (None: take it).


@dataclasses.dataclass(frozen=True)
class _XlaScan:
    """`xla_scan`: a plain-XLA scan over K chunks, never the whole float weight at once (explicit only)."""

    name: str = "xla_scan"
    backend: str = "cpu"

    def supports(self, prob, config):
        from afpq_jax._src.kernels.quantized_matmul import xla_scan
        return xla_scan.why_unsupported(prob, config.block_k)

    def default_config(self, prob, config=None):
        from afpq_jax._src.kernels.quantized_matmul import xla_scan
        return xla_scan.default_config(prob, config)

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


REGISTRY = Registry("quantized_matmul", {
    "tpu": ("mosaic_tpu", "xla"),
    "gpu": ("triton", "mosaic_gpu", "xla"),
    "cpu": ("cpu", "xla"),
})
IMPLEMENTATIONS: dict[str, Implementation] = REGISTRY.implementations
DISPATCH_ORDER: dict[str, tuple[str, ...]] = REGISTRY.dispatch_order


def register_implementation(impl: Implementation, *, replace: bool = False) -> Implementation:
    """Adds an implementation of `quantized_matmul` (named calls, and dispatch where `DISPATCH_ORDER` lists it)."""
    return REGISTRY.register(impl, replace=replace)


def _register_builtins() -> None:
    register_implementation(Reference(quantized_matmul_xla))
    register_implementation(_XlaScan())
    register_implementation(_Cpu())
    for name, backend, cls in (("mosaic_tpu", "tpu", "MosaicTpu"), ("triton", "gpu", "Triton"),
                               ("mosaic_gpu", "gpu", "MosaicGpu")):
        register_implementation(Deferred(name, backend, f"{__package__}.{name}", cls))


def default_config(impl: str, prob: Problem) -> BlockConfig:
    """``impl``'s default tiling for ``prob`` (its own rules, in its backend's file)."""
    return REGISTRY.default_config(impl, prob) or BlockConfig()


def resolve(impl: str, prob: Problem, config: BlockConfig | None) -> BlockConfig:
    """Fills the unset fields of ``config`` with ``impl``'s defaults for ``prob`` (which may depend on the fields
    the caller set, e.g. Mosaic GPU's pipeline depth on the caller's block_n)."""
    return base.merge(config, REGISTRY.default_config(impl, prob, config) or BlockConfig())


def _describe(prob: Problem) -> str:
    return (f"{prob.format_name}-{'asym' if prob.asym else 'sym'} g={'channel' if prob.per_channel else prob.group} "
            f"M={prob.m} K={prob.k} N={prob.n} x={prob.x_dtype}")


def resolve_tuned(name: str, prob: Problem, config: BlockConfig | None) -> BlockConfig:
    """``config`` over the measured tiling for this shape on this device (`tuning`), over the defaults; the
    measured tiling is dropped if the implementation declines it."""
    measured = tuning.tuned(name, prob)
    if measured is not None:
        cfg = resolve(name, prob, base.merge(config, measured))
        if IMPLEMENTATIONS[name].supports(prob, cfg) is None:
            return cfg
    return resolve(name, prob, config)


def select_implementation(prob: Problem, config: BlockConfig | None = None, backend: str | None = None,
                          *, log: bool = True) -> tuple[str, BlockConfig]:
    """The implementation (and resolved config) that ``implementation=None`` would run."""
    return REGISTRY.select(prob, backend or current_backend(), lambda name: resolve_tuned(name, prob, config),
                           lambda: _describe(prob), log=log)


def why_not(implementation: str, x, qt: QuantizedTensor, config: BlockConfig | None = None) -> str | None:
    """None if ``implementation`` supports ``x @ qt`` (x may be a ShapeDtypeStruct), else the reason: shapes,
    dtypes and tiling. A Pallas kernel also compiles only for its own platform (TPU or GPU; also from another host,
    for ahead-of-time lowering) or with ``interpret=True``; that is not checked here."""
    impl = REGISTRY.get(implementation)
    prob = Problem.create(x.shape, x.dtype, qt.with_float_scales())
    return impl.supports(prob, resolve_tuned(implementation, prob, config))


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
        REGISTRY.get(implementation)  # unknown names: one line listing the registered ones
        name = implementation
        cfg = resolve_tuned(name, prob, config)
        reason = IMPLEMENTATIONS[name].supports(prob, cfg)
        if reason is not None:
            raise NotImplementedError(f"quantized_matmul[{name}] does not support this call: {reason}")
    if name == "xla":
        return quantized_matmul_xla(x, qt)
    if prob.m == 0:
        return jnp.zeros((*x.shape[:-1], prob.n), x.dtype)
    def kernel(x2d, q):
        return IMPLEMENTATIONS[name](x2d, q, prob, cfg, interpret=interpret)

    y = base.with_reference_derivatives(kernel, quantized_matmul_xla)(x.reshape(prob.m, prob.k), qt)
    return y.reshape(*x.shape[:-1], prob.n)


_register_builtins()

__all__ = ["DISPATCH_ORDER", "IMPLEMENTATIONS", "Implementation", "current_backend", "default_config",
           "quantized_matmul", "register_implementation", "resolve", "select_implementation", "why_not"]

