"""Dense little-endian bit strings of ``b``-bit values in int32 words: the packing compressed-tensors uses along
a weight's rows and GPTQ along its columns.

Along the packed axis each line of values is one bit string, value ``i`` at bits ``i·b`` (least significant bit
first), cut into 32-bit words; a line of ``n`` values takes ``ceil(n·b/32)`` words, the last one zero-padded. A
3-bit value may straddle two words.
"""

from __future__ import annotations

import numpy as np


def pack_int32(values: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Unsigned ``bits``-bit values (each < 2^bits) -> int32 words, packed along ``axis``."""
    v = np.moveaxis(np.asarray(values, np.uint32), axis, -1)
    lead, count = v.shape[:-1], v.shape[-1]
    rows = v.reshape(-1, count)
    bit_rows = ((rows[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    bit_rows = bit_rows.reshape(rows.shape[0], count * bits)
    words = -(-count * bits // 32)
    bit_rows = np.pad(bit_rows, ((0, 0), (0, words * 32 - count * bits)))
    packed = np.packbits(bit_rows, axis=1, bitorder="little").view("<i4").reshape(*lead, words)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_int32(words: np.ndarray, bits: int, count: int, axis: int = -1) -> np.ndarray:
    """Inverse of `pack_int32`: int32 words -> ``count`` uint8 values along ``axis``."""
    w = np.ascontiguousarray(np.moveaxis(np.asarray(words), axis, -1), "<i4")
    lead = w.shape[:-1]
    rows = w.reshape(-1, w.shape[-1])
    bit_rows = np.unpackbits(rows.view(np.uint8).reshape(rows.shape[0], -1), axis=1, bitorder="little")
    bit_rows = bit_rows[:, :count * bits].reshape(rows.shape[0], count, bits)
    values = (bit_rows << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint32).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(values.reshape(*lead, count), -1, axis))
