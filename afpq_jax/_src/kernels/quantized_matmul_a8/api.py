"""`quantized_matmul_a8`: ``x @ W`` with x quantized to int8 (static per-tensor or dynamic per-token scale) and W
a packed `QuantizedTensor` with integer levels, computed on integers (int8 x int8 -> int32) with a float epilogue.

Implementations (registered in the shared `kernels.registry`, like `quantized_matmul`'s): "xla" (the reference
and the CPU path),
"mosaic_tpu" (TPU int8 MXU) and "triton" (GPU int8 tensor cores). Dispatch (``implementation=None``): tpu ->
mosaic_tpu, gpu -> triton, if the kernel supports the call, else xla (logged once); other backends -> xla. A named implementation never falls back (``NotImplementedError`` with the reason). The kernels take the "xla" path's
derivatives (`base.with_reference_derivatives`), so every implementation differentiates alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem, merge, with_reference_derivatives
from afpq_jax._src.kernels.quantized_matmul_a8.xla import quantized_matmul_a8_xla
from afpq_jax._src.kernels.registry import Deferred, Reference, Registry, current_backend
from afpq_jax._src.qtensor import QuantizedTensor

REGISTRY = Registry("quantized_matmul_a8", {"tpu": ("mosaic_tpu", "xla"), "gpu": ("triton", "xla")})
IMPLEMENTATIONS = REGISTRY.implementations
DISPATCH_ORDER = REGISTRY.dispatch_order


def register_implementation(impl, *, replace: bool = False):
    """Adds an implementation of `quantized_matmul_a8` (its call: ``(x2d, qt, input_scale, prob, config, *,
    interpret)``)."""
    return REGISTRY.register(impl, replace=replace)


register_implementation(Reference(quantized_matmul_a8_xla))
for _name, _backend, _cls in (("mosaic_tpu", "tpu", "MosaicTpu"), ("triton", "gpu", "Triton")):
    register_implementation(Deferred(_name, _backend, f"{__package__}.{_name}", _cls))


def resolve(impl: str, prob: Problem, config: BlockConfig | None) -> BlockConfig:
    """``config``'s unset fields from ``impl``'s W·A8 defaults for ``prob``."""
    return merge(config, REGISTRY.default_config(impl, prob, config) or BlockConfig())


def _describe(prob: Problem) -> str:
    return f"{prob.format_name} M={prob.m} K={prob.k} N={prob.n}"


def select_implementation(prob: Problem, config: BlockConfig | None = None, backend: str | None = None, *,
                          log: bool = True) -> tuple[str, BlockConfig]:
    """The implementation (and resolved config) that ``implementation=None`` would run."""
    return REGISTRY.select(prob, backend or current_backend(), lambda name: resolve(name, prob, config),
                           lambda: _describe(prob), log=log)


def why_not(implementation: str, x, qt: QuantizedTensor, config: BlockConfig | None = None) -> str | None:
    """None if ``implementation`` supports ``quantized_matmul_a8(x, qt)`` (shapes, formats, tiling; a Pallas kernel
    also needs its own platform or ``interpret=True``), else the reason."""
    impl = REGISTRY.get(implementation)
    prob = Problem.create(x.shape, x.dtype, qt)
    return impl.supports(prob, resolve(implementation, prob, config))


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
    if not qt.integer_scales:  # micro-scaled (float8) group scales reach the kernels as float32 scales
        qt = qt.with_float_scales()
    prob = Problem.create(x.shape, x.dtype, qt)
    if implementation is None:
        name, cfg = select_implementation(prob, config)
    else:
        name, cfg = implementation, resolve(implementation, prob, config)  # unknown names: one line
        reason = REGISTRY.get(name).supports(prob, cfg)
        if reason is not None:
            raise NotImplementedError(f"quantized_matmul_a8[{name}] does not support this call: {reason}")
    if name == "xla" or prob.m == 0:
        return quantized_matmul_a8_xla(x, qt, input_scale).astype(x.dtype)
    impl = REGISTRY.get(name)

    def kernel(x2d, q, scale):
        return impl(x2d, q, scale, prob, cfg, interpret=interpret).astype(x.dtype)

    def reference(x2d, q, scale):
        return quantized_matmul_a8_xla(x2d, q, scale).astype(x.dtype)

    y = with_reference_derivatives(kernel, reference)(x.reshape(prob.m, prob.k), qt, input_scale)
    return y.reshape(*x.shape[:-1], prob.n)
