"""Bit packing of code indices along the contraction axis.

Layout (the one place that knows it): a ``b``-bit code is split into *bit planes* whose widths divide 8 —
8 -> [8], 4 -> [4], 3 -> [2, 1] (low two bits, then the high bit), 2 -> [2], 1 -> [1]. Each plane of width
``w`` stores ``p = 8 // w`` consecutive rows of one column in one byte: row ``k`` sits in byte ``k // p`` at
bit offset ``w * (k % p)`` (least significant bits first). The planes are concatenated along the packed row
axis, so the packed array of a ``(..., K, N)`` code matrix is ``(..., packed_rows(K, bits), N)`` uint8 with
``K`` first padded to a multiple of 8 (pad codes are stored but dropped by `unpack`).

Every weight therefore costs exactly ``bits`` bits (3-bit included), plus at most 7 padding rows per column,
and a K-tile of ``8 * t`` weights maps to a contiguous row range of every plane (``t * w`` bytes), which is
what tiled kernels need.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import InputError

PACK_ROWS = 8  # K is padded to a multiple of this so every plane packs whole bytes.


def plane_widths(bits: int) -> tuple[int, ...]:
    if bits == 3:
        return (2, 1)
    if bits in (1, 2, 4, 8):
        return (bits,)
    raise InputError(f"cannot pack {bits}-bit codes; supported widths are 1, 2, 3, 4 and 8 bits")


def padded_rows(k: int) -> int:
    return -(-k // PACK_ROWS) * PACK_ROWS


def packed_rows(k: int, bits: int) -> int:
    """Number of uint8 rows the packed form of ``k`` code rows occupies."""
    return padded_rows(k) * bits // 8


# Jitted: eagerly, each of the ~20 shift / or / slice ops compiles on its own for every new shape.
@functools.partial(jax.jit, static_argnames=("bits",))
def pack(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Packs integer codes ``(..., K, N)`` (values < 2**bits) into uint8 ``(..., packed_rows(K, bits), N)``."""
    k = codes.shape[-2]
    codes = codes.astype(jnp.uint8)
    pad = padded_rows(k) - k
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 2) + [(0, pad), (0, 0)])
    kp = codes.shape[-2]
    planes, shift = [], 0
    for w in plane_widths(bits):
        p = 8 // w
        part = (codes >> shift) & ((1 << w) - 1)
        part = part.reshape(*codes.shape[:-2], kp // p, p, codes.shape[-1])
        byte = part[..., 0, :]
        for slot in range(1, p):
            byte = byte | (part[..., slot, :] << (w * slot))
        planes.append(byte)
        shift += w
    return planes[0] if len(planes) == 1 else jnp.concatenate(planes, axis=-2)


@functools.partial(jax.jit, static_argnames=("bits", "k"))
def unpack(packed: jnp.ndarray, bits: int, k: int) -> jnp.ndarray:
    """Inverse of `pack`: uint8 ``(..., packed_rows(k, bits), N)`` -> uint8 codes ``(..., k, N)``."""
    kp = padded_rows(k)
    if packed.shape[-2] != kp * bits // 8:
        raise InputError(f"packed array has {packed.shape[-2]} rows, expected {kp * bits // 8} for K={k} at "
                         f"{bits} bits")
    out, start, shift = None, 0, 0
    for w in plane_widths(bits):
        p = 8 // w
        rows = kp // p
        byte = packed[..., start:start + rows, :]
        slots = [(byte >> (w * s)) & ((1 << w) - 1) for s in range(p)]
        part = jnp.stack(slots, axis=-2).reshape(*byte.shape[:-2], kp, byte.shape[-1])
        part = part << shift if shift else part
        out = part if out is None else out | part
        start += rows
        shift += w
    return out[..., :k, :]
