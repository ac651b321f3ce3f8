"""`quantized_matmul_a8`: ``x @ W`` with x quantized to int8 (static per-tensor or dynamic per-token scale) and W
a packed `QuantizedTensor` with integer levels, computed on integers (int8 x int8 -> int32) with a float epilogue.

Implementations (same registry habits as `quantized_matmul`): "xla" (the reference and the CPU path),
"mosaic_tpu" (TPU int8 MXU) and "triton" (GPU int8 tensor cores). Dispatch (``implementation=None``): tpu ->
mosaic_tpu, gpu -> triton, if the kernel supports the call, else xla (logged once); other backends -> xla. A named implementation never falls back (``NotImplementedError`` with the reason). The kernels take the "xla" path's
derivatives (`base.with_reference_derivatives`), so every implementation differentiates alike.
"""

from __future__ import annotations

import importlib
import logging

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src.kernels.quantized_matmul.api import current_backend
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, with_reference_derivatives
from afpq_jax._src.kernels.quantized_matmul_a8.xla import quantized_matmul_a8_xla
from afpq_jax._src.qtensor import QuantizedTensor

logger = logging.getLogger("afpq_jax.kernels")

IMPLEMENTATIONS = ("xla", "mosaic_tpu", "triton")
DISPATCH_ORDER = {"tpu": ("mosaic_tpu", "xla"), "gpu": ("triton", "xla")}
_PALLAS = {"mosaic_tpu": ("mosaic_tpu", "MosaicTpu"), "triton": ("triton", "Triton")}  # imported on first use (Pallas imports cost ~0.5 s)
_LOGGED: set[tuple[str, str]] = set()


def _pallas(name: str):
    module, cls = _PALLAS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)()


def why_not(implementation: str, x, qt: QuantizedTensor, config: BlockConfig | None = None) -> str | None:
    """None if ``implementation`` supports ``quantized_matmul_a8(x, qt)`` (shapes, formats, tiling; a Pallas kernel
    also needs its own platform or ``interpret=True``), else the reason."""
    if implementation not in IMPLEMENTATIONS:
        raise InputError(f"unknown implementation {implementation!r}; registered: {list(IMPLEMENTATIONS)}")
    if implementation == "xla":
        return None
    impl = _pallas(implementation)
    prob = Problem.create(x.shape, x.dtype, qt)
    return impl.supports(prob, impl.config(prob, config))


def quantized_matmul_a8(x: jax.Array, qt: QuantizedTensor, input_scale: jax.Array | None = None, *,
                        implementation: str | None = None, config: BlockConfig | None = None,
                        interpret: bool = False) -> jax.Array:
    """``Q8(x) @ dequantize(qt)`` in x's dtype, where ``Q8(x) = xs · clip(round(x / xs), -127, 127)`` with
    ``xs = input_scale`` (static: a calibrated per-tensor scalar) or ``max|x| / 127`` per token (None: dynamic).

    Numerics (every implementation): the products and the per-group sums are exact integers (int32); the group
    scales, the activation scale and the sum over groups are applied in float32 afterwards (the only rounding
    besides Q8 itself; implementations differ only in the order of that float sum).
    """
    if not isinstance(qt, QuantizedTensor):
        raise ArgumentTypeError(f"quantized_matmul_a8 expects a QuantizedTensor, got {type(qt).__name__}")
    x = x if hasattr(x, "dtype") else jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ArgumentTypeError(f"x must be float activations (they are quantized here), got {jnp.dtype(x.dtype).name}")
    if qt.codes.ndim != 2:
        raise InputError("quantized_matmul_a8 takes a 2-D weight (stacked weights: vmap over the leading axes)")
    if x.shape[-1] != qt.in_features:
        raise InputError(f"x has {x.shape[-1]} features, the weight expects {qt.in_features}")
    if input_scale is not None and jnp.ndim(input_scale) != 0:
        raise InputError(f"input_scale must be a scalar (per-tensor static scale), got shape "
                         f"{jnp.shape(input_scale)}")
    if input_scale is not None and not isinstance(input_scale, jax.core.Tracer) and not float(input_scale) > 0:
        raise InputError(f"input_scale must be positive (max|x| / 127 from calibration), got {float(input_scale)}")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise InputError(f"unknown implementation {implementation!r}; registered: {list(IMPLEMENTATIONS)}")
    name = implementation
    prob = None
    if name != "xla":
        prob = Problem.create(x.shape, x.dtype, qt)
        for candidate in ([name] if name else DISPATCH_ORDER.get(current_backend(), ())):
            if candidate == "xla":
                name = "xla"
                break
            impl = _pallas(candidate)
            cfg = impl.config(prob, config)
            reason = impl.supports(prob, cfg)
            if reason is None:
                name = candidate
                break
            if implementation is not None:
                raise NotImplementedError(f"quantized_matmul_a8[{candidate}] does not support this call: {reason}")
            if (candidate, reason) not in _LOGGED:
                _LOGGED.add((candidate, reason))
                logger.warning("quantized_matmul_a8: %s declined %s (%s); using xla", candidate, prob.format_name,
                               reason)
        else:
            name = "xla"
    if name == "xla" or prob.m == 0:
        return quantized_matmul_a8_xla(x, qt, input_scale).astype(x.dtype)
    def kernel(x2d, q, scale):
        return impl(x2d, q, scale, prob, cfg, interpret=interpret).astype(x.dtype)

    def reference(x2d, q, scale):
        return quantized_matmul_a8_xla(x2d, q, scale).astype(x.dtype)

    y = with_reference_derivatives(kernel, reference)(x.reshape(prob.m, prob.k), qt, input_scale)
    return y.reshape(*x.shape[:-1], prob.n)
