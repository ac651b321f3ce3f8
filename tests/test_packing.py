"""Bit packing of codes along the contraction axis (`afpq_jax._src.packing`)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from afpq_jax._src import packing


@given(bits=st.sampled_from([1, 2, 3, 4, 8]), k=st.integers(1, 70), n=st.integers(1, 5),
       lead=st.sampled_from([(), (2,), (2, 3)]), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(bits, k, n, lead, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(*lead, k, n), dtype=np.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (*lead, packing.packed_rows(k, bits), n)
    assert packing.packed_rows(k, bits) == -(-k // 8) * bits  # exactly `bits` bits per weight (+ row padding)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, k)), codes)


def test_documented_bit_order():
    col = lambda v: np.asarray(v, np.uint8).reshape(-1, 1)  # noqa: E731
    # 4-bit: row 2r in the low nibble, row 2r+1 in the high nibble.
    assert np.asarray(packing.pack(col([1, 2, 3, 4, 5, 6, 7, 8]), 4))[:, 0].tolist() == [0x21, 0x43, 0x65, 0x87]
    # 2-bit: row 4r+i at bits 2i.
    assert np.asarray(packing.pack(col([1, 2, 3, 0, 0, 0, 0, 3]), 2))[:, 0].tolist() == [0b00111001, 0b11000000]
    # 3-bit: a 2-bit plane of the low bits, then a 1-bit plane of the high bits.
    p = np.asarray(packing.pack(col([7, 0, 4, 1, 0, 0, 0, 6]), 3))[:, 0].tolist()
    assert p == [0b01000011, 0b10000000, 0b10000101]


def test_padding_rows_are_dropped():
    codes = np.full((5, 2), 3, np.uint8)
    packed = packing.pack(codes, 4)
    assert packed.shape == (4, 2)
    np.testing.assert_array_equal(np.asarray(packing.unpack(packed, 4, 5)), codes)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cannot pack 5-bit"):
        packing.pack(np.zeros((8, 1), np.uint8), 5)
    with pytest.raises(ValueError, match="expected 4"):
        packing.unpack(np.zeros((3, 1), np.uint8), 4, 8)
