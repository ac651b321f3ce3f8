"""In-kernel decoding of packed codes: pure jnp on tiles, shared by every Pallas kernel.

Shifts, masks, compares, selects, converts and multiplies, plus, where the kernel can read a small table per
element (Triton: an L1-resident global load), one table lookup for a codebook level (`lookup_table`) in place of
the select tree or FP4 bit construction. Mosaic TPU and Mosaic GPU have no such gather and use the arithmetic.

Bit-exactness: every path computes the same float32 product as `afpq_jax._src.quantizer.decode` —
``level * scale`` (codebook; the scale is s_neg for negative levels, s_pos otherwise) or
``(code - zero) * scale`` (INT) — so the dequantized tile equals `dequantize(qt, float32)` elementwise.
Folding the sign into the scale (``|level| * (-s_neg)``) is exact: IEEE multiplication is sign-symmetric.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from afpq_jax._src.kernels.quantized_matmul.base import Problem

_F32_ONE_HALF_BITS = 252  # (pattern + 252) << 22 is the float32 bit pattern of E2M1 magnitude `pattern` >= 2
# 2^23 as float32 bits: OR-ing a code c < 2^23 into its mantissa gives the float32 2^23 + c exactly, so an INT code
# becomes a float with one integer op and no int -> float convert (a quarter-rate instruction on GPUs).
_F32_TWO_POW_23_BITS = 0x4B000000
_TWO_POW_23 = np.float32(2.0**23)


class Scales(NamedTuple):
    """Per-row-expanded scale tiles (float32, same shape as the slot matrices) for one chunk.

    pos: s_pos / sym scale / INT step. neg: for asym codebook formats s_neg, except for the sign-folding
    kinds ("e2m1", "signsym") where it is already negated (-s_neg; for sym: -scale). zero: INT only, the zero
    point plus 2^23 (the bias of `dequant`'s convert-free decode; exact: zero points are small integers); for sym
    INT the constant 2^23 + 2^(bits-1).
    """

    pos: jax.Array
    neg: jax.Array | None
    zero: jax.Array | None


def prepare_scales(prob: Problem, pos, neg=None, zero=None) -> Scales:
    """float32 scale tiles -> `Scales` for `dequant` (done once per chunk, shared by all slots)."""
    pos = pos.astype(jnp.float32)
    if prob.kind in ("e2m1", "signsym"):
        neg = -(neg.astype(jnp.float32) if prob.has_neg else pos)
    elif neg is not None:
        neg = neg.astype(jnp.float32)
    if zero is not None:
        zero = zero.astype(jnp.float32) + _TWO_POW_23
    elif prob.kind == "int":
        zero = _TWO_POW_23 + np.float32(2 ** (prob.bits - 1))
    return Scales(pos, neg, zero)


def slot_codes(prob: Problem, planes: list[jax.Array]) -> list[jax.Array]:
    """int32 plane tiles -> the ``p`` slot code tiles (int32, values < 2**bits).

    4-bit / 2-bit: ``planes = [P]`` (rows, n); slot s = bits [w*s, w*s + w) of P.
    3-bit: ``planes = [P2_even, P2_odd, P1]``: the 2-bit plane's even and odd byte rows (each holding 4 tile rows
    of slots 0-3 resp. 4-7) and the 1-bit plane; slot s = low bits from P2_{s // 4} at 2*(s % 4), high bit = bit
    s of P1.
    """
    if prob.bits == 3:
        even, odd, hi = planes
        out = []
        for s in range(8):
            lo = ((even if s < 4 else odd) >> (2 * (s % 4))) & 3
            out.append(lo | (((hi >> s) & 1) << 2))
        return out
    (plane,) = planes
    w = prob.bits
    mask = (1 << w) - 1
    return [(plane >> (w * s)) & mask if s else plane & mask for s in range(8 // w)]


def _select_tree(code: jax.Array, table: list[float]) -> jax.Array:
    """``table[code]`` for int32 ``code`` by a binary tree of selects keyed on the code's bits
    (len(table) - 1 selects, log2(len) bit tests)."""
    vals = [np.float32(v) for v in table]
    b = 0
    while len(vals) > 1:
        bit = (code & (1 << b)) != 0
        nxt = []
        for i in range(0, len(vals), 2):
            lo, hi = vals[i], vals[i + 1]
            if isinstance(lo, np.float32) and isinstance(hi, np.float32) and lo == hi and (
                    np.signbit(lo) == np.signbit(hi)):
                nxt.append(lo)
            else:
                nxt.append(jnp.where(bit, hi, lo))
        vals = nxt
        b += 1
    v = vals[0]
    if isinstance(v, np.float32):
        v = jnp.full(code.shape, v, jnp.float32)
    return v


def _pad_table(levels: tuple[float, ...], size: int) -> list[float]:
    lv = list(levels)
    return lv + [lv[-1]] * (size - len(lv))  # codes past the table never occur in a valid tensor


def lookup_table(prob: Problem) -> np.ndarray:
    """float32 ``(2**bits,)`` table a kernel indexes by code in `dequant`'s ``lookup``: the level's magnitude for
    the sign-folding kinds ("e2m1", "signsym": the sign comes with the scale), the signed level for "table"."""
    if prob.kind == "int":
        raise ValueError("INT codes decode arithmetically; there is no level table")
    levels = _pad_table(prob.fmt.levels, 2**prob.bits)
    if prob.kind in ("e2m1", "signsym"):
        levels = [abs(v) for v in levels]
    return np.asarray(levels, np.float32)


def dequant(prob: Problem, code: jax.Array, sc: Scales, lookup=None) -> jax.Array:
    """Codes (int32 tile) -> float32 weights, bit-identical to the reference decode.

    ``lookup(code)``, when given, returns `lookup_table` at each code (a kernel's table read); codebook levels
    then cost one lookup instead of a select tree or the FP4 bit construction. INT ignores it."""
    fmt = prob.fmt
    if prob.kind == "int":  # (2^23 + code) - (2^23 + zero) = code - zero exactly, then the same product
        code = code if code.dtype == jnp.int32 else code.astype(jnp.int32)  # the scan passes the uint8 codes
        biased = jax.lax.bitcast_convert_type(code | _F32_TWO_POW_23_BITS, jnp.float32)
        return (biased - sc.zero) * sc.pos
    n = 2**prob.bits
    half = n // 2
    if prob.kind in ("e2m1", "signsym"):
        neg = code < half
        if lookup is not None:
            mag = lookup(code)
        elif prob.kind == "e2m1":
            pattern = jnp.where(neg, (half - 1) - code, code - half)  # E2M1 magnitude bits e1 e0 m0
            big = jax.lax.bitcast_convert_type((pattern + _F32_ONE_HALF_BITS) << 22, jnp.float32)
            mag = jnp.where(pattern >= 2, big, pattern.astype(jnp.float32) * np.float32(0.5))
        else:
            idx = jnp.where(neg, (half - 1) - code, code - half)
            mag = _select_tree(idx, [abs(v) for v in fmt.levels[half:]])
        return mag * jnp.where(neg, sc.neg, sc.pos)
    # General table (NF4, NF3): the value, then the scale by the level's sign.
    value = lookup(code) if lookup is not None else _select_tree(code, _pad_table(fmt.levels, n))
    if prob.has_neg:
        n_negative = int(np.sum(np.asarray(fmt.levels) < 0))
        return value * jnp.where(code < n_negative, sc.neg, sc.pos)
    return value * sc.pos


def round_to_bfloat16(w: jax.Array) -> jax.Array:
    """float32 -> the nearest bfloat16 value (ties to even), kept as float32, for finite ``w``. Integer ops
    rather than a convert pair: XLA may drop a float32 -> bfloat16 -> float32 round trip (excess precision),
    which would make the interpreter's result differ from the GPU's."""
    bits = jax.lax.bitcast_convert_type(w, jnp.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequant_slots(prob: Problem, planes: list[jax.Array], sc: Scales, lookup=None) -> list[jax.Array]:
    return [dequant(prob, c, sc, lookup) for c in slot_codes(prob, planes)]


def integer_lookup_table(prob: Problem) -> np.ndarray:
    """int32 ``(2**bits,)`` table of ``m * level`` by code (codebook formats), for `integer_level`'s lookup."""
    mult = prob.fmt.int8_multiplier()
    if prob.kind == "int" or mult is None:
        raise ValueError(f"{prob.format_name} has no integer level table")
    return np.asarray([round(v * mult) for v in _pad_table(prob.fmt.levels, 2**prob.bits)], np.int32)


def integer_level(prob: Problem, code: jax.Array, lookup=None) -> jax.Array:
    """Codes (int32 tile) -> ``m * level`` as int32 (m = `Format.int8_multiplier`; INT: ``code - 2**(bits-1)``,
    the zero point moved the same way by the caller): the integer weights of the W·A8 kernels. FP4 E2M1 is
    arithmetic (magnitude pattern p: p for p < 2, else (2 + (p & 1)) << ((p >> 1) - 1)); other formats use a
    select tree over the integer table, or ``lookup(code)`` (`integer_lookup_table` read by the kernel)."""
    fmt = prob.fmt
    if prob.kind == "int":
        return code - 2 ** (prob.bits - 1)
    mult = fmt.int8_multiplier()
    if mult is None:
        raise ValueError(f"{fmt.name} has no integer levels")
    if lookup is not None:
        return lookup(code)
    half = 2**prob.bits // 2
    if prob.kind == "e2m1":
        neg = code < half
        pattern = jnp.where(neg, (half - 1) - code, code - half)
        shift = jnp.maximum((pattern >> 1) - 1, 0)
        mag = jnp.where(pattern >= 2, (2 + (pattern & 1)) << shift, pattern)
        return jnp.where(neg, -mag, mag)
    table = [float(round(v * mult)) for v in _pad_table(fmt.levels, 2**prob.bits)]
    return _select_tree(code, table).astype(jnp.int32)
