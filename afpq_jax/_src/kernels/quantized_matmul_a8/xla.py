"""The reference integer path (and the CPU path) of W·A8: int8 activations x integer weight levels, int32 sums.

Weights: a packed code c of group g, column n stands for ``level(c) * scale[g, n]`` (codebook formats; asymmetric
FP/NF picks ``scale_neg`` for negative levels) or ``(c - zero[g, n]) * scale[g, n]`` (INT). With ``m =
Format.int8_multiplier()`` every ``m * level`` is an integer up to 127 (FP4 E2M1: {0, ±1, ±2, ±3, ±4, ±6, ±8,
±12}), so per group the sums ``P[m, g, n] = Σ_k xq[m, k] · m·level[k, n]`` are exact in int32, and

    y[m, n] = xs[m] · Σ_g (scale[g, n] / m) · P[m, g, n]                     (symmetric)
    y[m, n] = xs[m] · Σ_g (s_pos[g, n] · P⁺[m, g, n] + s_neg[g, n] · P⁻[m, g, n]) / m   (AFPQ: by code sign)
    y[m, n] = xs[m] · Σ_g scale[g, n] · (P[m, g, n] − zero'[g, n] · R[m, g])   (INT asym; R = Σ_k xq in group g)

with INT codes and zero points shifted by 2**(bits-1) so that they fit int8. Only the epilogue (int32 -> float32
times the scales, summed over groups) rounds.

Integer group scales (`QuantizedTensor.channel_scale`, QServe's progressive scheme) make the weight itself int8,
``W8[k, n] = S[g, n] · m·level[k, n]`` (AFPQ: S_pos or S_neg by the level's sign; INT: ``S · (code − zero)``),
so the whole product is one int8 GEMM with a per-column epilogue:

    y[m, n] = xs[m] · channel_scale[n] / m · Σ_k xq[m, k] · W8[k, n]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src import packing
from afpq_jax._src.errors import InputError
from afpq_jax._src.qtensor import QuantizedTensor

INT8_MAX = 127


def activation_scale(x: jax.Array, input_scale: jax.Array | None) -> jax.Array:
    """The float32 scale of symmetric int8 activations: ``input_scale`` (static, per tensor) or
    ``max|x| / 127`` per token (dynamic; an all-zero token gets scale 1). Shape broadcastable to x."""
    if input_scale is not None:
        return jnp.asarray(input_scale, jnp.float32)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return jnp.where(amax > 0, amax / INT8_MAX, 1.0)


def quantize_activations(x: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 codes ``clip(round(x * (1 / scale)), -127, 127)`` (round half to even). The reciprocal is formed
    once per scale, so a reference can reproduce the codes exactly."""
    inv = 1.0 / scale
    return jnp.clip(jnp.round(x.astype(jnp.float32) * inv), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def _integer_levels(fmt, mult: int, dtype) -> jax.Array:
    """The code book's levels times ``mult`` (exact integers by `Format.int8_multiplier`), indexed by code."""
    return jnp.asarray(np.round(fmt.levels_array(np.float64) * mult).astype(dtype))


def integer_weight(qt: QuantizedTensor) -> tuple[list[jax.Array], list[jax.Array], jax.Array | None]:
    """The weight as int8 level tensors ``(G, g, N)`` and the float32 scale ``(G, N)`` each one's sums take:
    one part (symmetric, INT), or two (AFPQ: positive-level and negative-level codes). Third: the INT-asym zero
    point shifted into int8 range, as int32 ``(G, N)`` (None otherwise). The last group is zero-padded."""
    fmt = qt.format
    mult = fmt.int8_multiplier()
    if mult is None:
        raise InputError(f"{fmt.name} has no exact int8 representation; int8 activations need INT or FP weights")
    k, n = qt.in_features, qt.out_features
    g = qt.effective_group_size
    groups = -(-k // g)
    codes = packing.unpack(qt.codes, fmt.bits, k).astype(jnp.int32)
    codes = jnp.pad(codes, ((0, groups * g - k), (0, 0)), constant_values=fmt.zero_code())
    scale, scale_neg = qt.float_scales()
    if fmt.is_int:
        offset = 2 ** (fmt.bits - 1)
        levels = (codes - offset).astype(jnp.int8).reshape(groups, g, n)
        # symmetric INT has the implicit zero point 2**(bits-1): 0 after the shift
        zero = qt.zero.astype(jnp.int32) - offset if qt.asym else None
        return [levels], [scale], zero
    table = _integer_levels(fmt, mult, np.int8)
    levels = table[codes].reshape(groups, g, n)
    if not qt.asym:
        return [levels], [scale / mult], None
    zero8 = jnp.zeros((), jnp.int8)
    return ([jnp.where(levels > 0, levels, zero8), jnp.where(levels < 0, levels, zero8)],
            [scale / mult, scale_neg / mult], None)


def int8_weight(qt: QuantizedTensor) -> tuple[jax.Array, jax.Array]:
    """A weight with integer group scales as one int8 matrix ``W8`` (K, N) and its float32 column scale (N,)
    (``channel_scale / m``), so that ``W8 · column scale = dequantize(qt)`` exactly."""
    fmt = qt.format
    k = qt.in_features
    g = qt.effective_group_size
    codes = packing.unpack(qt.codes, fmt.bits, k).astype(jnp.int32)
    rows = jnp.minimum(jnp.arange(k) // g, qt.num_groups - 1)
    scale = qt.scale.astype(jnp.int32)[rows]
    if fmt.is_int:
        zero = qt.zero.astype(jnp.int32)[rows] if qt.asym else 2 ** (fmt.bits - 1)
        w8 = scale * (codes - zero)
        mult = 1
    else:
        mult = fmt.int8_multiplier()
        levels = _integer_levels(fmt, mult, np.int32)[codes]
        if qt.asym:
            scale = jnp.where(levels < 0, qt.scale_neg.astype(jnp.int32)[rows], scale)
        w8 = scale * levels
    return w8.astype(jnp.int8), qt.channel_scale.astype(jnp.float32) / mult


def group_sums(xq: jax.Array, w: jax.Array) -> jax.Array:
    """``P[m, g, n] = Σ_k xq[m, g, k] · w[g, k, n]`` in int32 (int8 x int8 dot_general, int32 accumulation)."""
    return jax.lax.dot_general(xq, w, (((2,), (1,)), ((1,), (0,))),
                               preferred_element_type=jnp.int32).transpose(1, 0, 2)


def quantized_matmul_a8_xla(x: jax.Array, qt: QuantizedTensor, input_scale: jax.Array | None) -> jax.Array:
    """``fake_quant_int8(x) @ dequantize(qt)`` on the integer path; x (..., K) -> (..., N) float32."""
    k, n = qt.in_features, qt.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    xs = activation_scale(x2, input_scale)
    xq = quantize_activations(x2, xs)
    if qt.integer_scales:  # one int8 GEMM, per-column epilogue
        w8, col_scale = int8_weight(qt)
        acc = jax.lax.dot_general(xq, w8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * col_scale * xs).reshape(*lead, n)
    parts, scales, zero = integer_weight(qt)
    groups, g, _ = parts[0].shape
    xg = jnp.pad(xq, ((0, 0), (0, groups * g - k))).reshape(-1, groups, g)
    acc = None
    for w, s in zip(parts, scales):
        p = group_sums(xg, w)  # (M, G, N) int32
        if zero is not None:
            p = p - zero[None] * jnp.sum(xg, axis=-1, dtype=jnp.int32)[:, :, None]
        term = jnp.sum(p.astype(jnp.float32) * s[None], axis=1)
        acc = term if acc is None else acc + term
    return (acc * xs).reshape(*lead, n)
