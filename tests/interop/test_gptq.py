"""GPTQ's and AWQ-GEMM's layer layouts, against a numpy decoder written from the formats' descriptions (Python
integers, word by word), independent of the module's packers."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax._src import packing
from afpq_jax._src.errors import CheckpointError, InputError, NotExportable
from afpq_jax._src.interop import gptq

IN, OUT = 256, 64
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# ---- reference decoder, from the spec ---------------------------------------------------------------------


def _u32(x) -> int:
    return int(x) & 0xFFFFFFFF


def _ref_unpack_gptq(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """int32 ``[count·bits/32, M]`` -> ``[count, M]`` values, packed along axis 0. b in {2, 4, 8}: row r holds
    values (32/b)·r + k at bits b·k. b = 3: rows 3c..3c+2 are one 96-bit little-endian string holding values
    32c + i at bits 3i."""
    m = words.shape[1]
    out = np.zeros((count, m), np.int64)
    mask = (1 << bits) - 1
    for col in range(m):
        if bits == 3:
            for c in range(count // 32):
                s = _u32(words[3 * c, col]) | _u32(words[3 * c + 1, col]) << 32 | _u32(words[3 * c + 2, col]) << 64
                for i in range(32):
                    out[32 * c + i, col] = (s >> (3 * i)) & mask
        else:
            per = 32 // bits
            for r in range(count // per):
                word = _u32(words[r, col])
                for k in range(per):
                    out[per * r + k, col] = (word >> (bits * k)) & mask
    return out


def _ref_unpack_awq(words: np.ndarray) -> np.ndarray:
    """int32 ``[R, C/8]`` -> ``[R, C]``: the nibble at bits 4j of word w is column 8w + AWQ_ORDER[j]."""
    r, wn = words.shape
    out = np.zeros((r, wn * 8), np.int64)
    for i in range(r):
        for w in range(wn):
            word = _u32(words[i, w])
            for j in range(8):
                out[i, 8 * w + AWQ_ORDER[j]] = (word >> (4 * j)) & 15
    return out


def _ref_gptq(t: dict, bits: int, group_size: int, fmt: str, static: bool = True) -> np.ndarray:
    """The float32 weight ``[out, in]`` a GPTQ loader computes: ``scales[g_idx[i]] · (q − z)``, z = stored + 1
    (v1, wrapping within the field) or stored (v2). ``static``: also checks g_idx is ``i // group_size``."""
    out = t["scales"].shape[1]
    k = t["g_idx"].shape[0]
    q = _ref_unpack_gptq(t["qweight"], bits, k)  # [in, out]
    z = _ref_unpack_gptq(np.ascontiguousarray(t["qzeros"].T), bits, out).T  # [groups, out]
    if fmt == "gptq":
        z = (z + 1) % (1 << bits)
    g = t["g_idx"].astype(np.int64)
    g_size = k if group_size == -1 else group_size
    if static:
        np.testing.assert_array_equal(g, np.arange(k) // g_size)
    w = (q - z[g]).astype(np.float32) * t["scales"][g].astype(np.float32)
    return w.T


def _ref_awq(t: dict, group_size: int) -> np.ndarray:
    q = _ref_unpack_awq(t["qweight"])
    z = _ref_unpack_awq(t["qzeros"])
    g = np.arange(q.shape[0]) // group_size
    return ((q - z[g]).astype(np.float32) * t["scales"][g].astype(np.float32)).T


def _weight(shape=(IN, OUT), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _qt(codes, scale, zero=None, *, bits=4, group_size=None):
    """A QuantizedTensor from hand-chosen unpacked codes (in, out), scales and zero points (groups, out)."""
    codes = np.asarray(codes, np.uint8)
    qt = aq.QuantizedTensor(codes=packing.pack(jnp.asarray(codes), bits), scale=jnp.asarray(scale, jnp.float16),
                            zero=None if zero is None else jnp.asarray(zero, jnp.uint8), format_name=f"int{bits}",
                            group_size=group_size, asym=zero is not None, shape=codes.shape, dtype="float32")
    qt.validate()
    return qt


def _assert_same_leaves(a, b, *, scale_values_only=False):
    assert (a.format_name, a.asym, a.shape, a.dtype) == (b.format_name, b.asym, b.shape, b.dtype)
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    if scale_values_only:
        np.testing.assert_array_equal(np.asarray(a.scale, np.float32), np.asarray(b.scale, np.float32))
    else:
        assert a.scale.dtype == b.scale.dtype
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    assert (a.zero is None) == (b.zero is None)
    if a.zero is not None:
        np.testing.assert_array_equal(np.asarray(a.zero), np.asarray(b.zero))


# ---- known answers ----------------------------------------------------------------------------------------


def test_known_answer_words():
    # 4-bit: inputs 0..7 with codes 0..7 in one word, input k at bits 4k
    assert gptq.pack_gptq_rows(np.arange(8)[:, None], 4)[0, 0] == 0x76543210
    assert gptq.pack_gptq_rows(np.tile(np.arange(4), 4)[:, None], 2)[0, 0] == _as_i32(0xE4E4E4E4)
    assert gptq.pack_gptq_rows(np.array([[1], [2], [3], [0xFF]]), 8)[0, 0] == _as_i32(0xFF030201)
    # AWQ: codes 0..7 of outputs 0..7 -> nibbles in order 0, 2, 4, 6, 1, 3, 5, 7
    assert gptq.pack_awq_cols(np.arange(8)[None])[0, 0] == 0x75316420
    np.testing.assert_array_equal(gptq.unpack_awq_cols(np.array([[0x75316420]], np.int32)), np.arange(8)[None])


def _as_i32(u: int) -> int:
    return int(np.array([u], np.uint32).view(np.int32)[0])


def test_encoded_sym_int4_layer_known_words():
    # in 8, out 8 (the smallest 4-bit layer); codes 0..7 down every column
    codes = np.tile(np.arange(8)[:, None], (1, 8))
    qt = _qt(codes, np.full((1, 8), 0.5))
    t = gptq.encode_layer(qt)
    assert gptq.default_format(qt) == "gptq"
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (1, 8)
    assert np.all(t["qweight"] == 0x76543210)
    assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (1, 1)
    assert t["qzeros"][0, 0] == 0x77777777  # v1: z − 1 = 7 in every field
    assert t["scales"].dtype == np.float16 and t["g_idx"].dtype == np.int32
    np.testing.assert_array_equal(t["g_idx"], np.zeros(8))


def test_three_bit_chunks_straddle_words():
    v = np.zeros((32, 1), np.int64)
    v[10] = 7  # bits 30..32: two bits at the top of word 0, one at the bottom of word 1
    v[21] = 5  # bits 63..65: bit 31 of word 1 (1), bits 0..1 of word 2 (0b10)
    v[31] = 6  # bits 93..95: the top of word 2
    w = gptq.pack_gptq_rows(v, 3)
    assert w.shape == (3, 1)
    assert [_u32(x) for x in w[:, 0]] == [0xC0000000, 0x80000001, 0xC0000002]
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 8, (96, 5))
    words = gptq.pack_gptq_rows(vals, 3)
    assert words.shape == (9, 5)
    np.testing.assert_array_equal(_ref_unpack_gptq(words, 3, 96), vals)
    np.testing.assert_array_equal(gptq.unpack_gptq_rows(words, 3, 96), vals)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packers_match_the_reference(bits):
    rng = np.random.default_rng(bits)
    vals = rng.integers(0, 2**bits, (64, 7))
    words = gptq.pack_gptq_rows(vals, bits)
    assert words.dtype == np.int32 and words.shape == (64 * bits // 32, 7)
    np.testing.assert_array_equal(_ref_unpack_gptq(words, bits, 64), vals)
    np.testing.assert_array_equal(gptq.unpack_gptq_rows(words, bits, 64), vals)
    if bits == 4:
        a = rng.integers(0, 16, (3, 24))
        np.testing.assert_array_equal(_ref_unpack_awq(gptq.pack_awq_cols(a)), a)
        np.testing.assert_array_equal(gptq.unpack_awq_cols(gptq.pack_awq_cols(a)), a)


# ---- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_round_trip(bits, asym, group):
    qt = aq.quantize(_weight(seed=bits), f"int{bits}", group_size=group, asym=asym, scale_dtype="float16")
    assert gptq.why_not_exportable(qt) is None
    t = gptq.encode_layer(qt)
    fmt = gptq.default_format(qt)
    assert fmt == ("gptq_v2" if asym else "gptq")
    groups = 1 if group is None else IN // group
    assert t["qweight"].shape == (IN * bits // 32, OUT) and t["qweight"].dtype == np.int32
    assert t["qzeros"].shape == (groups, OUT * bits // 32) and t["qzeros"].dtype == np.int32
    assert t["scales"].shape == (groups, OUT) and t["scales"].dtype == np.float16
    assert t["g_idx"].shape == (IN,) and t["g_idx"].dtype == np.int32
    gs = -1 if group is None else group
    want = np.asarray(aq.dequantize(qt))
    np.testing.assert_array_equal(_ref_gptq(t, bits, gs, fmt), want.T)
    back = _decode_plain(t, bits=bits, group_size=gs, sym=not asym, checkpoint_format=fmt, in_features=IN)
    back.validate()
    assert back.group_size == group
    _assert_same_leaves(back, qt)
    np.testing.assert_array_equal(np.asarray(aq.dequantize(back)), want)


@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("asym", [True, False])
def test_awq_round_trip(asym, group):
    qt = aq.quantize(_weight(seed=5), "int4", group_size=group, asym=asym, scale_dtype="float16")
    assert gptq.awq_why_not_exportable(qt) is None
    t = gptq.encode_awq_layer(qt)
    groups = 1 if group is None else IN // group
    assert set(t) == {"qweight", "qzeros", "scales"}
    assert t["qweight"].shape == (IN, OUT // 8) and t["qweight"].dtype == np.int32
    assert t["qzeros"].shape == (groups, OUT // 8) and t["qzeros"].dtype == np.int32
    assert t["scales"].shape == (groups, OUT) and t["scales"].dtype == np.float16
    gs = IN if group is None else group  # AWQ has no -1: one group of in_features
    want = np.asarray(aq.dequantize(qt))
    np.testing.assert_array_equal(_ref_awq(t, gs), want.T)
    back = gptq.decode_awq_layer(t, group_size=gs, in_features=IN)
    assert back.asym and back.zero is not None and back.format_name == "int4"
    np.testing.assert_array_equal(np.asarray(aq.dequantize(back)), want)
    if asym:
        _assert_same_leaves(back, qt)
    else:  # the implicit zero point is written out
        assert np.all(np.asarray(back.zero) == 8)
    assert gptq.decode_awq_layer(t, group_size=-1 if group is None else gs, in_features=IN).group_size == group


def test_bfloat16_and_exact_float32_scales_export_as_float16():
    for sd in ("bfloat16", "float32"):
        qt = aq.quantize(_weight(seed=7), "int4", group_size=64, asym=True, scale_dtype=sd)
        if sd == "float32":  # make the scales float16 values held as float32
            qt = dataclasses.replace(qt, scale=qt.scale.astype(jnp.float16).astype(jnp.float32))
        t = gptq.encode_layer(qt)
        assert t["scales"].dtype == np.float16
        want = np.asarray(aq.dequantize(qt))
        np.testing.assert_array_equal(_ref_gptq(t, 4, 64, "gptq_v2"), want.T)
        back = _decode_plain(t, bits=4, group_size=64, sym=False, checkpoint_format="gptq_v2", in_features=IN)
        _assert_same_leaves(back, qt, scale_values_only=True)
        np.testing.assert_array_equal(np.asarray(aq.dequantize(back)), want)


def test_integer_scales_export_when_float16_holds_their_products():
    qt = aq.quantize(_weight(seed=8), "int4", group_size=32, asym=False, scale_dtype="float16", integer_scales=True)
    assert qt.integer_scales
    exact = dataclasses.replace(qt, channel_scale=jnp.full_like(qt.channel_scale, 2.0**-6))  # powers of two
    t = gptq.encode_layer(exact)
    np.testing.assert_array_equal(_ref_gptq(t, 4, 32, "gptq"), np.asarray(aq.dequantize(exact)).T)
    inexact = dataclasses.replace(qt, channel_scale=jnp.full_like(qt.channel_scale, 0.0999755859375))  # 11-bit
    reason = gptq.why_not_exportable(inexact)
    assert reason is not None and "integer group scales" in reason and "float16" in reason


# ---- zero points: v1 against v2 ---------------------------------------------------------------------------


def test_asym_zero_point_zero_needs_v2():
    codes = np.tile(np.arange(8)[:, None], (1, 8)) * 2 + 1
    zero = np.array([[0, 1, 2, 3, 8, 13, 14, 15]])
    qt = _qt(codes, np.full((1, 8), 0.25), zero)
    assert gptq.default_format(qt) == "gptq_v2"
    t = gptq.encode_layer(qt)
    assert _u32(t["qzeros"][0, 0]) == 0xFED83210  # v2: z itself, output k at bits 4k
    np.testing.assert_array_equal(_ref_gptq(t, 4, -1, "gptq_v2"), np.asarray(aq.dequantize(qt)).T)
    # the same zero points as v1 (z − 1 per field) would put 0xF in the first field, which a loader's word-wide
    # +0x11111111 carries into the next field: v1 cannot carry z = 0
    v1 = gptq.pack_gptq_rows((zero.T - 1) % 16, 4)[0, 0]
    assert _u32(v1) == 0xEDC7210F
    assert (_u32(v1) + 0x11111111) & 0xFF == 0x20  # fields 0, 1 read as z = 0, 2 instead of 0, 1
    back = _decode_plain(t, bits=4, group_size=-1, sym=False, checkpoint_format="gptq_v2", in_features=8)
    _assert_same_leaves(back, qt)


def test_decode_hand_built_v1_checkpoint():
    # in 32, out 8, 4-bit, groups of 16: input i of output o has code (i + o) % 16
    k, n, bits, g = 32, 8, 4, 16
    codes = (np.arange(k)[:, None] + np.arange(n)[None]) % 16
    qweight = np.zeros((k // 8, n), np.uint32)
    for i in range(k):
        for o in range(n):
            qweight[i // 8, o] |= int(codes[i, o]) << (4 * (i % 8))
    scales = np.array([[0.5] * n, [0.25] * n], np.float16)
    # sym: every stored field 7 (z − 1)
    t = {"qweight": qweight.view(np.int32), "qzeros": np.full((2, 1), 0x77777777, np.int32), "scales": scales,
         "g_idx": (np.arange(k) // g).astype(np.int32)}
    qt = _decode_plain(t, bits=bits, group_size=g, sym=True, checkpoint_format="gptq", in_features=k)
    assert not qt.asym and qt.zero is None and qt.group_size == g and qt.shape == (k, n)
    assert qt.scale.dtype == jnp.float16
    want = (codes - 8) * np.repeat(scales.astype(np.float32), g, axis=0)
    np.testing.assert_array_equal(np.asarray(aq.dequantize(qt)), want)
    # asym v1: stored z − 1 per field, a field of 0xF wraps to z = 0
    zf = np.array([[15, 0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14]])
    qzeros = np.array([[sum(int(v) << (4 * j) for j, v in enumerate(row))] for row in zf], np.uint32).view(np.int32)
    qt = _decode_plain({**t, "qzeros": qzeros}, bits=bits, group_size=g, sym=False, checkpoint_format="gptq",
                           in_features=k, dtype="bfloat16")
    z = (zf + 1) % 16
    assert qt.asym and qt.dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(qt.zero), z)
    want = (codes - np.repeat(z, g, axis=0)) * np.repeat(scales.astype(np.float32), g, axis=0)
    np.testing.assert_array_equal(np.asarray(aq.dequantize(qt, jnp.float32)), want)


def test_sym_checkpoint_with_other_zero_points_decodes_as_asym():
    qt0 = aq.quantize(_weight(seed=3), "int4", group_size=64, asym=True, scale_dtype="float16")
    t = gptq.encode_layer(qt0)
    # the same zero points written the v1 way, under a config that claims sym
    zeros = np.asarray(qt0.zero).astype(np.int64)
    t1 = {**t, "qzeros": gptq.pack_gptq_rows(((zeros - 1) % 16).T, 4).T.copy()}
    back = _decode_plain(t1, bits=4, group_size=64, sym=True, checkpoint_format="gptq", in_features=IN)
    assert back.asym and back.zero is not None
    _assert_same_leaves(back, qt0)
    np.testing.assert_array_equal(_ref_gptq(t1, 4, 64, "gptq").T, np.asarray(aq.dequantize(back)))
    # a sym=False checkpoint keeps its zero leaf even when every zero point is the centre
    sym = aq.quantize(_weight(seed=3), "int4", group_size=64, asym=False, scale_dtype="float16")
    back = _decode_plain(gptq.encode_layer(sym), bits=4, group_size=64, sym=False, checkpoint_format="gptq",
                             in_features=IN)
    assert back.asym and np.all(np.asarray(back.zero) == 8)
    np.testing.assert_array_equal(np.asarray(aq.dequantize(back)), np.asarray(aq.dequantize(sym)))


# ---- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,reason", [
    (lambda w: aq.quantize(w, "nf4", group_size=64, asym=False), "nf4 code book"),
    (lambda w: aq.quantize(w, "fp4_e2m1", group_size=64, asym=True), "two scales"),
    (lambda w: aq.quantize(w, "int4", group_size=64, scale_dtype="float32"), "float32 scales"),
    (lambda w: aq.quantize(np.stack([w, w]), "int4", group_size=64), "stacked"),
    (lambda w: aq.quantize(w[:200], "int3", group_size=None), "in_features 200 is not a multiple of 32"),
    (lambda w: aq.quantize(w[:, :48], "int3", group_size=32), "out_features 48 is not a multiple of 32"),
    (lambda w: aq.quantize(w, "int4", group_size=96), "not a multiple of group_size 96"),
])
def test_gptq_refusals(make, reason):
    qt = make(_weight(seed=4))
    got = gptq.why_not_exportable(qt)
    assert got is not None and reason in got, got
    with pytest.raises(NotExportable, match=reason):
        gptq.encode_layer(qt)
    assert issubclass(NotExportable, InputError)


@pytest.mark.parametrize("make,reason", [
    (lambda w: aq.quantize(w, "int8", group_size=64), "8-bit integers"),
    (lambda w: aq.quantize(w, "int3", group_size=64), "3-bit integers"),
    (lambda w: aq.quantize(w, "nf4", group_size=64), "nf4 code book"),
    (lambda w: aq.quantize(w[:, :60], "int4", group_size=64), "out_features 60 is not a multiple of 8"),
    (lambda w: aq.quantize(w, "int4", group_size=64, scale_dtype="float32"), "float32 scales"),
])
def test_awq_refusals(make, reason):
    qt = make(_weight(seed=4))
    got = gptq.awq_why_not_exportable(qt)
    assert got is not None and reason in got, got
    with pytest.raises(NotExportable, match=reason):
        gptq.encode_awq_layer(qt)


# ---- import errors ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_layer():
    qt = aq.quantize(_weight(seed=6), "int4", group_size=64, asym=False, scale_dtype="float16")
    return gptq.encode_layer(qt)


def _decode_plain(*args, **kw):
    """`gptq.decode_layer` of static groups: the tensor (no permutation)."""
    qt, perm = gptq.decode_layer(*args, **kw)
    assert perm is None
    return qt


def _decode(t, **kw):
    args = dict(bits=4, group_size=64, sym=True, checkpoint_format="gptq", in_features=IN) | kw
    return _decode_plain(t, **args)


def test_act_order_g_idx_round_trips_through_a_row_permutation(int4_layer):
    """desc_act: rows of a group are scattered over the input; decoded, the rows are stored in group order plus
    the permutation, and the weight in the input's order is what the reference GPTQ loader computes."""
    g_idx = (np.random.default_rng(0).permutation(IN) // 64).astype(np.int32)
    t = {**int4_layer, "g_idx": g_idx}
    qt, perm = gptq.decode_layer(t, bits=4, group_size=64, sym=True, checkpoint_format="gptq", in_features=IN)
    assert perm is not None and np.array_equal(g_idx[perm], np.arange(IN) // 64)
    in_order = np.asarray(aq.dequantize(qt))[np.argsort(perm)]
    np.testing.assert_array_equal(_ref_gptq(t, 4, 64, "gptq", static=False), in_order.T)
    back = gptq.encode_layer(qt, input_perm=perm)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        np.testing.assert_array_equal(back[name], t[name], err_msg=name)
    with pytest.raises(CheckpointError, match="does not put 64 input rows in each group"):
        _decode({**int4_layer, "g_idx": np.minimum(g_idx, 2).astype(np.int32)})
    # no g_idx at all: the static grouping
    t = {k: v for k, v in int4_layer.items() if k != "g_idx"}
    assert _decode(t).num_groups == IN // 64


@pytest.mark.parametrize("change,kw,match", [
    (("qweight", lambda a: a.astype(np.float32)), {}, r"qweight: dtype float32, expected int32"),
    (("qweight", lambda a: a[:-1]), {}, r"qweight: shape \(31, 64\), expected \(32, 64\)"),
    (None, {"in_features": 512}, r"qweight: shape \(32, 64\), expected \(64, 64\)"),
    (None, {"group_size": 96}, r"group_size: 96 does not divide in_features 256"),
    (None, {"group_size": 0}, r"group_size: 0 is neither -1"),
    (None, {"group_size": 32}, r"qzeros: shape \(4, 8\), expected \(8, 8\)"),
    (("scales", lambda a: a[:, :-1]), {}, r"scales: shape \(4, 63\), expected \(4, 64\)"),
    (("scales", lambda a: a.astype(np.int32)), {}, r"scales: dtype int32"),
    (("scales", lambda a: -a), {}, r"scales: has negative"),
    (("qzeros", lambda a: a.astype(np.int64)), {}, r"qzeros: dtype int64, expected int32"),
    (("g_idx", lambda a: a[:-1]), {}, r"g_idx: int32 \(255,\), expected"),
    (None, {"bits": 5}, r"bits: 5 is not one of"),
    (None, {"checkpoint_format": "marlin"}, r"checkpoint_format: 'marlin'"),
    (None, {"bits": 3, "in_features": 80}, r"in_features: 80 is not a multiple of 32"),
    (("qweight", None), {}, r"qweight: missing"),
])
def test_bad_gptq_tensors_are_refused(int4_layer, change, kw, match):
    t = dict(int4_layer)
    if change is not None:
        name, fn = change
        if fn is None:
            del t[name]
        else:
            t[name] = fn(t[name])
    with pytest.raises(CheckpointError, match=match):
        _decode(t, **kw)


def test_bad_awq_tensors_are_refused():
    qt = aq.quantize(_weight(seed=9), "int4", group_size=64, asym=True, scale_dtype="float16")
    t = gptq.encode_awq_layer(qt)
    with pytest.raises(CheckpointError, match=r"qweight: shape \(256, 8\), expected \(128, 8\)"):
        gptq.decode_awq_layer(t, group_size=64, in_features=128)
    with pytest.raises(CheckpointError, match=r"qzeros: shape \(4, 8\), expected \(2, 8\)"):
        gptq.decode_awq_layer(t, group_size=128, in_features=IN)
    with pytest.raises(CheckpointError, match=r"group_size: 100 does not divide"):
        gptq.decode_awq_layer(t, group_size=100, in_features=IN)
    with pytest.raises(CheckpointError, match=r"scales: dtype float64"):
        gptq.decode_awq_layer({**t, "scales": t["scales"].astype(np.float64)}, group_size=64, in_features=IN)
    with pytest.raises(CheckpointError, match=r"qweight: dtype uint8"):
        gptq.decode_awq_layer({**t, "qweight": t["qweight"].view(np.uint8)}, group_size=64, in_features=IN)


def test_a_v2_file_writes_its_symmetric_layers_as_v2_and_v1_refuses_zero_points():
    qt = aq.quantize(_weight(seed=7), "int4", group_size=32, asym=False, scale_dtype="float16")
    v1, v2 = gptq.encode_layer(qt), gptq.encode_layer(qt, checkpoint_format="gptq_v2")
    assert np.all(v1["qzeros"] == 0x77777777) and np.all(v2["qzeros"] == np.int32(-2004318072))  # 0x88888888
    back = _decode_plain(v2, bits=4, group_size=32, sym=True, checkpoint_format="gptq_v2", in_features=IN)
    _assert_same_leaves(back, qt)
    with pytest.raises(aq.InputError, match="gptq_v2"):
        gptq.encode_layer(aq.quantize(_weight(seed=7), "int4", group_size=32, asym=True), checkpoint_format="gptq")
