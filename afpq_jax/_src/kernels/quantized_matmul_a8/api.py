"""`quantized_matmul_a8`: ``x @ W`` with x quantized to int8 (static per-tensor or dynamic per-token scale) and W
a packed `QuantizedTensor` with integer levels, computed on integers (int8 x int8 -> int32) with a float epilogue.

Implementations are registered like `quantized_matmul`'s; today only "xla" (the reference and the CPU path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src.kernels.quantized_matmul_a8.xla import quantized_matmul_a8_xla
from afpq_jax._src.qtensor import QuantizedTensor

IMPLEMENTATIONS = {"xla": quantized_matmul_a8_xla}


def quantized_matmul_a8(x: jax.Array, qt: QuantizedTensor, input_scale: jax.Array | None = None, *,
                        implementation: str | None = None) -> jax.Array:
    """``Q8(x) @ dequantize(qt)`` in x's dtype, where ``Q8(x) = xs · clip(round(x / xs), -127, 127)`` with
    ``xs = input_scale`` (static: a calibrated per-tensor scalar) or ``max|x| / 127`` per token (None: dynamic).

    Numerics: the products and the per-group sums are exact integers (int32); the group scales, the activation
    scale and the sum over groups are applied in float32 afterwards (the only rounding besides Q8 itself).
    """
    if not isinstance(qt, QuantizedTensor):
        raise ArgumentTypeError(f"quantized_matmul_a8 expects a QuantizedTensor, got {type(qt).__name__}")
    if qt.codes.ndim != 2:
        raise InputError("quantized_matmul_a8 takes a 2-D weight (stacked weights: vmap over the leading axes)")
    if x.shape[-1] != qt.in_features:
        raise InputError(f"x has {x.shape[-1]} features, the weight expects {qt.in_features}")
    if input_scale is not None and jnp.ndim(input_scale) != 0:
        raise InputError(f"input_scale must be a scalar (per-tensor static scale), got shape "
                         f"{jnp.shape(input_scale)}")
    name = implementation or "xla"
    if name not in IMPLEMENTATIONS:
        raise InputError(f"unknown implementation {name!r}; registered: {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name](x, qt, input_scale).astype(x.dtype)
