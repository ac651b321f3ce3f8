"""Pure-functional quantizers: group scales, encode (round to code), decode, and the public entry points.

Everything here is jit/vmap/grad-safe. Algorithms (RTN, GPTQ, AWQ, clipping search) build on three pieces:
`group_params` (scales from a group's range), `encode` (values -> code indices) and `decode` (codes -> values),
all of which broadcast over arbitrary leading axes.

Rounding rule, every format: the nearest level; a value exactly on a decision threshold goes to the *lower*
code index. Codebook formats compare ``t = x * (1 / scale)`` with the constant midpoints between neighbouring
levels, which needs no argmin over the table and no per-element division; INT formats use
``ceil(x * (1 / scale) + zero - 0.5)``, the same rule on a uniform grid. Near-ties (within float32 rounding
of a threshold) may go either way; both choices are nearest levels to float32 precision.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
import numpy as np

from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src import formats as formats_lib
from afpq_jax._src import packing
from afpq_jax._src.formats import Format
from afpq_jax._src.qtensor import FLOAT_SCALE_DTYPES, GLOBAL_SCALED, LEAF_NAMES, SCALE_DTYPES, QuantizedTensor

E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
E8M0_MIN_EXPONENT = -126  # smallest stored E8M0 scale 2^-126: float32's smallest normal (E8M0 has no zero)


class GroupParams(NamedTuple):
    """Per-group quantization parameters, broadcastable against the grouped values.

    scale: s_pos (asym codebook) / the scale (sym) / the step (INT asym).
    scale_neg: s_neg for asym codebook formats, else None.
    zero: integer zero point (as float32 or uint8) for asym INT, else None.
    """

    scale: jax.Array
    scale_neg: jax.Array | None = None
    zero: jax.Array | None = None


def _safe(s: jax.Array) -> jax.Array:
    # A zero scale only occurs when that side of the group holds no values (or only zeros), so any
    # non-zero divisor gives the right codes; 1 keeps 0/0 from ever appearing.
    return jnp.where(s > 0, s, jnp.ones_like(s))


def recip_up(d: float) -> np.float32:
    """The smallest float32 >= 1/d: scales ``x * recip_up(D)`` never fall below ``x / D``, which keeps a
    re-quantized grid's top code in place (the fixed-point property below)."""
    r = np.float32(1.0 / d)
    return r if float(r) >= 1.0 / d else np.nextafter(r, np.float32(np.inf))


def _sym_int_max(fmt: Format) -> int:
    return 2 ** (fmt.bits - 1) - 1


def _divisor(fmt: Format, asym: bool) -> int | float:
    """A group's range over its scale: the largest level magnitude (FP / NF), the largest symmetric integer
    (INT sym) or the number of steps (INT asym, whose range is max - min)."""
    if fmt.is_int:
        return 2**fmt.bits - 1 if asym else _sym_int_max(fmt)
    return fmt.divisor


def _ranges(fmt: Format, asym: bool, xmin: jax.Array, xmax: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(range of the scale or s_pos, range of s_neg or None), from a range with ``xmin <= 0 <= xmax``."""
    if fmt.is_int:
        return (xmax - xmin if asym else jnp.maximum(xmax, -xmin)), None
    return (xmax, -xmin) if asym else (jnp.maximum(xmax, -xmin), None)


def global_scale_of(fmt: Format, asym: bool, xmin: jax.Array, xmax: jax.Array, scale_dtype) -> jax.Array | None:
    """The per-tensor float32 scale of E4M3 group scales (None for scale dtypes without one, `GLOBAL_SCALED`):
    ``448 · D / R``, ``R`` the largest range over the tensor's groups (both sides), ``D`` the format's divisor
    (`_divisor`), so the largest group scale is E4M3's largest value. For FP4 E2M1 this is NVFP4's
    ``448 · 6 / amax``. Reduces the last three axes of grouped ranges ``(..., G, 1, N)``; an all-zero tensor
    gets 1."""
    if jnp.dtype(scale_dtype).name not in GLOBAL_SCALED:
        return None
    xmin = jnp.minimum(xmin.astype(jnp.float32), 0.0)
    xmax = jnp.maximum(xmax.astype(jnp.float32), 0.0)
    pos, neg = _ranges(fmt, asym, xmin, xmax)
    r = pos if neg is None else jnp.maximum(pos, neg)
    r = jnp.max(r, axis=(-3, -2, -1), keepdims=True)
    return jnp.where(r > 0, (E4M3_MAX * _divisor(fmt, asym)) / jnp.where(r > 0, r, 1.0), 1.0)


def tensor_global_scale(w: jax.Array, fmt: str | Format, *, group_size: int | None, asym: bool,
                        scale_dtype: DTypeLike) -> jax.Array | None:
    """The global scale `quantize` would give weight ``w`` ``(..., K, N)`` (``(...)`` float32), or None for scale
    dtypes without one."""
    if jnp.dtype(scale_dtype).name not in GLOBAL_SCALED:
        return None
    fmt = formats_lib.get_format(fmt)
    wg = to_groups(jnp.asarray(w, jnp.float32), _group_size(w.shape[-2], group_size))
    gs = global_scale_of(fmt, asym, jnp.min(wg, axis=-2, keepdims=True), jnp.max(wg, axis=-2, keepdims=True),
                         scale_dtype)
    return gs.reshape(gs.shape[:-3])


def shared_global_scale(weights, fmt: str | Format, *, group_size: int | None, asym: bool,
                        scale_dtype: DTypeLike) -> jax.Array | None:
    """One global scale for several weights quantized alike (the q/k/v or gate/up projections a server runs as
    one fused matmul with one global scale, as NVFP4 checkpoints for vLLM have them): the global scale of their
    column concatenation, i.e. the smallest of their own (the largest range sets it). None without E4M3 scales."""
    scales = [tensor_global_scale(w, fmt, group_size=group_size, asym=asym, scale_dtype=scale_dtype) for w in weights]
    if not scales or scales[0] is None:
        return None
    return functools.reduce(jnp.minimum, scales)


def check_global_scale(global_scale, scale_dtype, lead: tuple[int, ...]) -> jax.Array | None:
    """A caller's global scale: only for E4M3 scales, positive and finite, one per weight (``lead`` axes)."""
    if global_scale is None:
        return None
    if jnp.dtype(scale_dtype).name not in GLOBAL_SCALED:
        raise InputError(f"global_scale applies to float8_e4m3fn group scales only, not {jnp.dtype(scale_dtype).name}")
    gs = jnp.asarray(global_scale, jnp.float32)
    if gs.size != max(1, int(np.prod(lead))):
        raise InputError(f"global_scale has {gs.size} values; the weight needs one per tensor ({lead or 'a scalar'})")
    if not isinstance(gs, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(gs) & (gs > 0))):
        raise InputError(f"global_scale must be positive and finite, got {np.asarray(gs)}")
    return gs


def _rounded_scale(r: jax.Array, d: int | float, scale_dtype, global_scale: jax.Array | None) -> jax.Array:
    """The float32 scale of range ``r`` over divisor ``d`` as ``scale_dtype`` stores it.

    float16 / bfloat16 / float32: ``r / d`` rounded toward zero (see `group_params`). float8_e4m3fn: ``r / d``
    times ``global_scale``, rounded to the nearest E4M3 value (saturating at 448), times the global scale's
    reciprocal (NVFP4's rule). float8_e8m0fnu: OCP MX's shared exponent, ``2^(floor(log2 r) - floor(log2 d))``
    (the block's largest power of two over the element format's; values beyond the top level then saturate),
    at least 2^-126 (a side with no values gets that smallest scale: E8M0 has no zero)."""
    name = jnp.dtype(scale_dtype).name
    if name == "float8_e8m0fnu":
        _, e = jnp.frexp(r)  # r = m * 2^e with m in [0.5, 1): floor(log2 r) = e - 1
        exponent = jnp.clip(e - 1 - int(math.floor(math.log2(d))), E8M0_MIN_EXPONENT, 127)
        return jnp.where(r > 0, jnp.ldexp(jnp.ones_like(r), exponent), 2.0**E8M0_MIN_EXPONENT)
    s = r * recip_up(d)
    if name in GLOBAL_SCALED:
        if global_scale is None:
            raise ValueError(f"{name} group scales need the tensor's global scale (global_scale_of); a bug")
        stored = jnp.minimum(s * global_scale, E4M3_MAX).astype(scale_dtype).astype(jnp.float32)
        return stored * (1.0 / global_scale)  # `QuantizedTensor.float_scales`' spelling
    q = s.astype(scale_dtype)
    q = jnp.where(q.astype(jnp.float32) > s, jnp.nextafter(q, jnp.zeros_like(q)), q)
    return q.astype(jnp.float32)


def group_params(fmt: Format, asym: bool, xmin: jax.Array, xmax: jax.Array, scale_dtype=jnp.float16,
                 global_scale: jax.Array | None = None) -> GroupParams:
    """Scales from a group's range. ``xmin <= 0 <= xmax`` is enforced here (zero is always in range).

    Float scales (float16 / bfloat16 / float32) are rounded toward zero into ``scale_dtype`` *before* any code
    is chosen: the stored scales are the ones the codes were chosen for, a group's extreme value always lands
    on the outermost code (rounding up could leave it one code short, e.g. for int8 with float16 scales), and
    so ``quantize(dequantize(q))`` is a fixed point. Scales past the dtype's range saturate at its largest
    finite value. The micro-scaled formats follow their own rules (`_rounded_scale`): E4M3 scales (under
    ``global_scale``, `global_scale_of`, broadcastable against the ranges) round to nearest as NVFP4's do,
    E8M0 scales are OCP MX's powers of two; either may leave a group's extreme past the top level, where it
    saturates.
    """
    xmin = jnp.minimum(xmin.astype(jnp.float32), 0.0)
    xmax = jnp.maximum(xmax.astype(jnp.float32), 0.0)
    d = _divisor(fmt, asym)
    pos, neg = _ranges(fmt, asym, xmin, xmax)
    scale = _rounded_scale(pos, d, scale_dtype, global_scale)
    if fmt.is_int and asym:
        zero = jnp.clip(jnp.round(-xmin / _safe(scale)), 0, 2**fmt.bits - 1)
        return GroupParams(scale, None, zero)
    return GroupParams(scale, None if neg is None else _rounded_scale(neg, d, scale_dtype, global_scale))


def encode(fmt: Format, asym: bool, x: jax.Array, params: GroupParams) -> jax.Array:
    """Rounds values to code indices (uint8), given broadcastable group parameters.

    Codebook formats scale ``x`` by the reciprocal of its side's scale (``t = x * (1 / s_pos)`` for ``x >= 0``,
    ``x * (1 / s_neg)`` below; reciprocals are per group) and count the code book's midpoints below ``t``:
    ``code = #{k : t > midpoint_k}``. INT formats multiply by the per-group reciprocal step and round with
    ``ceil(t - 0.5)``.
    """
    x = x.astype(jnp.float32)
    if fmt.is_int:
        t = x * (1.0 / _safe(params.scale))
        offset = params.zero if asym else float(2 ** (fmt.bits - 1))
        lo, hi = (0, 2**fmt.bits - 1) if asym else (2 ** (fmt.bits - 1) - _sym_int_max(fmt),
                                                     2 ** (fmt.bits - 1) + _sym_int_max(fmt))
        return jnp.clip(jnp.ceil(t + offset - 0.5), lo, hi).astype(jnp.uint8)
    # Scale to the code book's units with the per-group reciprocal (one multiply and one select per element),
    # then compare with the midpoints as compile-time constants. A zero side scale means that side holds no
    # values; a unit divisor keeps zeros encoding as the zero code.
    inv_pos = 1.0 / _safe(params.scale.astype(jnp.float32))
    inv_neg = 1.0 / _safe(params.scale_neg.astype(jnp.float32)) if asym else inv_pos
    t = x * (jnp.where(x >= 0, inv_pos, inv_neg) if asym else inv_pos)
    # Unrolled comparisons fuse into one elementwise loop; no (..., num_codes) intermediate.
    levels = fmt.levels
    code = jnp.zeros(x.shape, jnp.uint8)
    passed = None
    for k, m in enumerate(fmt.midpoints()):
        if levels[k] != levels[k + 1]:
            passed = (t > m).astype(jnp.uint8)
        # A repeated level (FP's -0/+0) reuses the previous threshold, so every zero encodes as the last
        # copy (+0) and each value has exactly one code.
        code = code + passed
    return code


def decode(fmt: Format, asym: bool, codes: jax.Array, params: GroupParams) -> jax.Array:
    """Code indices -> float32 values, given broadcastable group parameters."""
    if fmt.is_int:
        zero = params.zero.astype(jnp.float32) if asym else float(2 ** (fmt.bits - 1))
        return (codes.astype(jnp.float32) - zero) * params.scale.astype(jnp.float32)
    values = jnp.asarray(fmt.levels_array())[codes.astype(jnp.int32)]
    if asym:
        scale = jnp.where(values < 0, params.scale_neg, params.scale).astype(jnp.float32)
    else:
        scale = params.scale.astype(jnp.float32)
    return values * scale


# ---------------------------------------------------------------------------------------------------------
# Integer group scales (QServe's progressive group quantization, applied to every format with int8 levels).


def channel_scale_of(params: GroupParams, top: int, scale_dtype) -> jax.Array:
    """The per-column float scale ``(..., 1, 1, N)`` of integer group scales: the column's largest group scale
    over ``top`` (= `Format.integer_scale_max`), rounded *up* into ``scale_dtype`` so every group's ratio stays
    at most ``top``. An all-zero column gets 0."""
    s = params.scale if params.scale_neg is None else jnp.maximum(params.scale, params.scale_neg)
    c = jnp.max(s, axis=-3, keepdims=True) * recip_up(top)
    r = c.astype(scale_dtype)
    r = jnp.where(r.astype(jnp.float32) < c, jnp.nextafter(r, jnp.full_like(r, jnp.inf)), r)
    return r.astype(jnp.float32)


def snap_to_integer_scales(fmt: Format, asym: bool, wg: jax.Array, params: GroupParams, channel: jax.Array,
                           top: int, lo: jax.Array | None = None) -> GroupParams:
    """Group params whose scales are ``channel * S`` with integer ``S`` in [1, top] (0 for an empty side).

    ``S`` is ⌊s / channel⌋ or ⌈s / channel⌉, whichever gives the group's values (``wg`` (..., G, g, N)) the lower
    squared error — per side for AFPQ (each side's values use only their own scale), with the zero point
    recomputed for INT-asym from the group's (clipped) minimum ``lo`` (default: its minimum). The returned
    scales are the exact float32 products ``channel * S``.
    """
    if lo is None:
        lo = jnp.min(wg, axis=-2, keepdims=True)
    safe = _safe(channel)

    def candidates(s):
        r = s / safe
        return [jnp.where(s > 0, jnp.clip(f(r), 1, top), 0.0) for f in (jnp.floor, jnp.ceil)]

    def with_scale(s, s_neg=None):
        if fmt.is_int and asym:
            zero = jnp.clip(jnp.round(-jnp.minimum(lo, 0.0) / _safe(s * channel)), 0, 2**fmt.bits - 1)
            return GroupParams(s * channel, None, zero)
        return GroupParams(s * channel, None if s_neg is None else s_neg * channel, None)

    def sq_err(p, mask=None):
        e = jnp.square(wg - decode(fmt, asym, encode(fmt, asym, wg, p), p))
        return jnp.sum(e if mask is None else jnp.where(mask, e, 0.0), axis=-2, keepdims=True)

    lo_pos, hi_pos = candidates(params.scale)
    if params.scale_neg is None:
        p_lo, p_hi = with_scale(lo_pos), with_scale(hi_pos)
        take_hi = sq_err(p_hi) < sq_err(p_lo)
        return GroupParams(*(None if a is None else jnp.where(take_hi, b, a) for a, b in zip(p_lo, p_hi)))
    lo_neg, hi_neg = candidates(params.scale_neg)
    p_lo, p_hi = with_scale(lo_pos, lo_neg), with_scale(hi_pos, hi_neg)
    e_lo, e_hi = [(sq_err(p, wg >= 0), sq_err(p, wg < 0)) for p in (p_lo, p_hi)]
    return GroupParams(jnp.where(e_hi[0] < e_lo[0], p_hi.scale, p_lo.scale),
                       jnp.where(e_hi[1] < e_lo[1], p_hi.scale_neg, p_lo.scale_neg), None)


def integer_scale_limit(fmt: Format, asym: bool) -> int:
    """`Format.integer_scale_max`, or an `InputError` naming the formats that have integer group scales."""
    top = fmt.integer_scale_max(asym)
    if top == 0:
        raise InputError(f"{fmt.name} has no integer group scales (its levels times a scale of 2 do not fit int8); "
                         f"use int2/int3/int4, fp4_e2m1 or fp3_e2m0, or float group scales")
    return top


def integer_leaves(params: GroupParams, channel: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Storage of snapped params: uint8 ``S`` for scale (and scale_neg) ``(..., G, N)``, channel ``(..., N)``.
    ``S = scale / channel`` is exact (the scales are exact multiples)."""
    safe = _safe(channel)
    ints = [None if p is None else jnp.round(p / safe)[..., 0, :].astype(jnp.uint8)
            for p in (params.scale, params.scale_neg)]
    return ints[0], ints[1], channel[..., 0, 0, :]


# ---------------------------------------------------------------------------------------------------------
# Grouping: (..., K, N) <-> (..., G, g, N), zero-padding a short last group (zeros never change the scales).


def _group_size(k: int, group_size: int | None) -> int:
    return k if group_size is None else min(group_size, k)


def to_groups(w: jax.Array, g: int) -> jax.Array:
    k = w.shape[-2]
    n_groups = math.ceil(k / g)
    pad = n_groups * g - k
    if pad:
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, pad), (0, 0)])
    return w.reshape(*w.shape[:-2], n_groups, g, w.shape[-1])


def from_groups(wg: jax.Array, k: int) -> jax.Array:
    return wg.reshape(*wg.shape[:-3], -1, wg.shape[-1])[..., :k, :]


@functools.partial(jax.jit, static_argnames=("fmt", "asym", "g", "scale_dtype", "integer_scales"))
def _quantize_codes(w, fmt: Format, asym: bool, g: int, scale_dtype, clip_ratios=None, integer_scales=False,
                    global_scale=None):
    """Unpacked codes ``(..., K, N)``, group params ``(..., G, 1, N)``, with ``integer_scales`` the channel
    scale ``(..., 1, 1, N)`` (else None) and with E4M3 scales the global scale ``(..., 1, 1, 1)`` (else None) of
    one weight.

    ``clip_ratios`` (optional pair of ``(..., G, 1, N)`` arrays in (0, 1]) shrink each group's negative and
    positive extremes before the scales are computed (the clipping search's result); the global scale comes
    from the unclipped weight, unless ``global_scale`` (``(...)`` float32, one per weight) gives it.
    """
    wg = to_groups(w.astype(jnp.float32), g)
    lo, hi = jnp.min(wg, axis=-2, keepdims=True), jnp.max(wg, axis=-2, keepdims=True)
    gs = global_scale_of(fmt, asym, lo, hi, scale_dtype)
    if gs is not None and global_scale is not None:
        gs = jnp.asarray(global_scale, jnp.float32).reshape(gs.shape)
    if clip_ratios is not None:
        lo, hi = lo * clip_ratios[0], hi * clip_ratios[1]
    params = group_params(fmt, asym, lo, hi, scale_dtype, gs)
    channel = None
    if integer_scales:
        top = fmt.integer_scale_max(asym)
        channel = channel_scale_of(params, top, scale_dtype)
        params = snap_to_integer_scales(fmt, asym, wg, params, channel, top, lo)
    return from_groups(encode(fmt, asym, wg, params), w.shape[-2]), params, channel, gs


@functools.partial(jax.jit, static_argnames=("fmt", "asym", "g", "dtype"))
def _decode_codes(codes, params: GroupParams, fmt: Format, asym: bool, g: int, dtype):
    k = codes.shape[-2]
    return from_groups(decode(fmt, asym, to_groups(codes, g), params), k).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# Public API.


def check_group_size(group_size) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                                   or group_size <= 0):
        raise InputError(f"group_size must be a positive integer or None (per-channel), got {group_size!r}")


def check_weight(w) -> jax.Array:
    """``w`` as a jax array after the checks every quantizer makes (at least 2-D, floating, non-empty, finite
    when concrete); `InputError` / `ArgumentTypeError` naming the problem otherwise."""
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        w = np.asarray(w)
    if len(w.shape) < 2:
        raise InputError(f"weight must be at least 2-D (in_features, out_features) in Flax kernel layout, got "
                         f"shape {tuple(w.shape)}; reshape it or add a leading axis")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ArgumentTypeError(f"weight dtype {jnp.dtype(w.dtype).name} is not floating point; cast it to float32 or "
                        f"bfloat16 first")
    if 0 in w.shape:
        raise InputError(f"weight has an empty dimension (shape {tuple(w.shape)}); nothing to quantize")
    if not isinstance(w, jax.core.Tracer):
        finite = np.isfinite(np.asarray(w, dtype=np.float32))
        if not finite.all():
            bad = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise InputError(f"weight has {int((~finite).sum())} NaN/inf entries (first at index {bad}); "
                             f"quantization needs finite weights — fix the checkpoint or the preceding step")
    return jnp.asarray(w)


def check_clip_ratios(clip_ratios, shape: tuple[int, ...], g: int) -> None:
    """``clip_ratios`` is None or a (negative side, positive side) pair of ``(..., G, 1, N)`` arrays for a weight
    of ``shape`` in groups of ``g`` rows, with values in (0, 1] (checked when concrete)."""
    if clip_ratios is None:
        return
    want = (-(-shape[-2] // g), 1, shape[-1])
    if not isinstance(clip_ratios, (tuple, list)) or len(clip_ratios) != 2:
        raise InputError(f"clip_ratios must be a (negative side, positive side) pair of arrays, got "
                         f"{type(clip_ratios).__name__}")
    for side, r in zip(("negative", "positive"), clip_ratios):
        got = tuple(np.shape(r))
        if got[-3:] != want or len(got) > len(shape) + 1:
            raise InputError(f"clip_ratios' {side} side has shape {got}; a weight of shape {tuple(shape)} in groups "
                             f"of {g} needs (..., {want[0]}, 1, {want[2]}): search them with the same group size")
        if not isinstance(r, jax.core.Tracer):
            v = np.asarray(r, np.float32)
            if not np.all((v > 0) & (v <= 1)):
                raise InputError(f"clip_ratios must lie in (0, 1] (shrink factors), got {side} side values from "
                                 f"{v.min():.4g} to {v.max():.4g}")


def check_asym(asym) -> bool:
    if not isinstance(asym, (bool, np.bool_)):
        raise InputError(f"asym must be True or False, got {asym!r}")
    return bool(asym)


def check_scale_dtype(scale_dtype) -> jnp.dtype:
    try:
        dt = jnp.dtype(scale_dtype)
    except TypeError:
        raise InputError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}") from None
    if dt.name not in SCALE_DTYPES:
        raise InputError(f"scale_dtype must be one of {SCALE_DTYPES}, got {dt.name}")
    return dt


def check_integer_scale_dtype(scale_dtype) -> None:
    """Integer group scales sit under a float channel scale: float16, bfloat16 or float32."""
    if jnp.dtype(scale_dtype).name not in FLOAT_SCALE_DTYPES:
        raise InputError(f"integer group scales need a float16/bfloat16/float32 channel scale, not "
                         f"{jnp.dtype(scale_dtype).name}; drop integer_scales or choose a float scale dtype")


def _checked(w, fmt, group_size, asym, scale_dtype, integer_scales) -> tuple[jax.Array, Format, bool, jnp.dtype, int]:
    """`quantize`'s and `fake_quant`'s arguments checked: (weight, format, asym, scale dtype, group size)."""
    fmt = formats_lib.get_format(fmt)
    check_group_size(group_size)
    asym = check_asym(asym)
    dt = check_scale_dtype(scale_dtype)
    if integer_scales:
        integer_scale_limit(fmt, asym)
        check_integer_scale_dtype(dt)
    w = check_weight(w)
    return w, fmt, asym, dt, _group_size(w.shape[-2], group_size)


def quantize(w: jax.Array, fmt: str | Format, *, group_size: int | None = 128, asym: bool = True,
             scale_dtype: DTypeLike = jnp.float16, clip_ratios: tuple[jax.Array, jax.Array] | None = None,
             integer_scales: bool = False, global_scale: jax.Array | float | None = None) -> QuantizedTensor:
    """Round-to-nearest quantization of a weight ``(..., in_features, out_features)`` into packed codes.

    Groups are ``group_size`` consecutive entries along the contraction axis (axis -2) of one output column;
    ``None`` gives one group per column. ``asym=True`` is AFPQ for FP/NF formats (separate ``s_pos``/``s_neg``)
    and min/max affine for INT formats; ``asym=False`` is symmetric absmax. ``clip_ratios`` = (negative side,
    positive side) per-group shrink factors ``(..., G, 1, N)`` from `algorithms.clip` (default: no clipping).
    ``integer_scales``: group scales are small integers times a per-column ``scale_dtype`` scale
    (`snap_to_integer_scales`; see `QuantizedTensor.channel_scale`). ``global_scale``: E4M3 scales only, the
    per-tensor scale to use instead of the weight's own (`shared_global_scale`: one for layers a server fuses).
    """
    w, fmt, asym, dt, g = _checked(w, fmt, group_size, asym, scale_dtype, integer_scales)
    check_clip_ratios(clip_ratios, w.shape, g)
    global_scale = check_global_scale(global_scale, dt, w.shape[:-2])
    codes, params, channel, gs = _quantize_codes(w, fmt, asym, g, dt, clip_ratios, bool(integer_scales),
                                                 global_scale)
    return packed_tensor(codes, params, channel, fmt=fmt, group_size=group_size, asym=asym,
                         scale_dtype=dt, dtype=w.dtype, global_scale=gs)


def packed_tensor(codes: jax.Array, params: GroupParams, channel: jax.Array | None, *, fmt: Format,
                  group_size: int | None, asym: bool, scale_dtype, dtype,
                  global_scale: jax.Array | None = None) -> QuantizedTensor:
    """The `QuantizedTensor` of unpacked codes ``(..., K, N)`` and group params ``(..., G, 1, N)`` (with
    ``channel`` ``(..., 1, 1, N)``: integer group scales; with ``global_scale`` broadcastable as
    ``(..., 1, 1, 1)``: E4M3 group scales under it)."""
    leaves = _storage_leaves(codes, params, channel, global_scale, fmt.bits, jnp.dtype(scale_dtype))
    return QuantizedTensor(
        **dict(zip(LEAF_NAMES, leaves)), format_name=fmt.name,
        group_size=None if group_size is None else int(group_size), asym=bool(asym),
        shape=tuple(int(d) for d in codes.shape), dtype=jnp.dtype(dtype).name)


@functools.partial(jax.jit, static_argnames=("bits", "scale_dtype"))
def _storage_leaves(codes, params: GroupParams, channel, global_scale, bits: int, scale_dtype):
    """`QuantizedTensor`'s leaves (`LEAF_NAMES` order) for `packed_tensor`, as one compiled program (op by op,
    each new weight shape compiled five small programs)."""
    zero = None if params.zero is None else params.zero[..., 0, :].astype(jnp.uint8)
    stored_global = None
    if channel is None:
        def stored(s):  # E4M3: times the global scale again (within an ulp of the E4M3 value: rounds back to it)
            return (s if global_scale is None else s * global_scale)[..., 0, :].astype(scale_dtype)
        scale = stored(params.scale)
        scale_neg = None if params.scale_neg is None else stored(params.scale_neg)
        channel_scale = None
        if global_scale is not None:
            stored_global = global_scale.reshape(*codes.shape[:-2], 1).astype(jnp.float32)
    else:
        scale, scale_neg, channel_scale = integer_leaves(params, channel)
        channel_scale = channel_scale.astype(scale_dtype)
    return packing.pack(codes, bits), scale, scale_neg, zero, channel_scale, stored_global


def dequantize(qt: QuantizedTensor, dtype: DTypeLike | None = None) -> jax.Array:
    """Reconstructs the weight (same shape; ``dtype`` defaults to the original weight's dtype)."""
    if not isinstance(qt, QuantizedTensor):
        raise ArgumentTypeError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    if dtype is not None:
        try:
            floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise InputError(f"dequantize dtype must be a float dtype (float32, bfloat16, float16), got {dtype!r}")
    fmt = qt.format
    codes = packing.unpack(qt.codes, fmt.bits, qt.in_features)
    pos, neg = qt.float_scales()
    params = GroupParams(pos[..., None, :], None if neg is None else neg[..., None, :],
                         None if qt.zero is None else qt.zero[..., None, :])
    return _decode_codes(codes, params, fmt, qt.asym, qt.effective_group_size, jnp.dtype(dtype or qt.dtype))


def fake_quant(w: jax.Array, fmt: str | Format, *, group_size: int | None = 128, asym: bool = True,
               scale_dtype: DTypeLike = jnp.float16, integer_scales: bool = False) -> jax.Array:
    """``dequantize(quantize(w))`` without packing, with a straight-through (identity) gradient."""
    w, fmt, asym, dt, g = _checked(w, fmt, group_size, asym, scale_dtype, integer_scales)
    codes, params, _, _ = _quantize_codes(jax.lax.stop_gradient(w), fmt, asym, g, dt, None, bool(integer_scales))
    dq = _decode_codes(codes, params, fmt, asym, g, w.dtype)
    # dq + (w - sg(w)) is exactly dq in value and has d/dw = identity (w + sg(dq - w) can be off by an ulp).
    return dq + (w - jax.lax.stop_gradient(w))
