"""The quantizer and `QuantizedTensor` against the numpy reference (tests/reference.py): rounding, error bounds,
pytree behaviour, storage and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import afpq_jax as aq
from afpq_jax._src import packing
from tests import reference as ref

ALL = ["int2", "int3", "int4", "int8", "fp4_e2m1", "fp3_e2m0", "nf4", "nf3"]
SCALE_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-22}
SCALE_TINY = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149}  # subnormal spacing


def _weights(kind: str, k: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.standard_normal((k, n))
    elif kind == "heavy":  # student-t with 2 dof: outliers as in real LLM weights
        w = rng.standard_t(2, (k, n))
    elif kind == "positive":
        w = np.abs(rng.standard_normal((k, n)))
    elif kind == "negative":
        w = -np.abs(rng.standard_normal((k, n)))
    elif kind == "constant":
        w = np.full((k, n), rng.standard_normal())
    elif kind == "zeros":
        w = np.zeros((k, n))
    else:  # "mixed": some columns one-signed, some zero, some normal, some tiny
        w = rng.standard_normal((k, n))
        w[:, ::4] = np.abs(w[:, ::4])
        w[:, 1::4] = 0.0
        w[: k // 2, 2::4] = -np.abs(w[: k // 2, 2::4]) * 1e-3
    return (w * 0.05).astype(np.float32)


def _check_against_reference(w, fmt, group_size, asym, scale_dtype):
    qt = aq.quantize(w, fmt, group_size=group_size, asym=asym, scale_dtype=scale_dtype)
    qt.validate()
    got = np.asarray(aq.dequantize(qt), np.float64)
    want, side_scale, near_tie = ref.ref_quantize(w, fmt, group_size, asym, scale_dtype)
    assert np.all(np.isfinite(got))
    mismatch = got != want
    # Only values sitting on a decision threshold (to float32 precision) may round the other way, and then
    # only to an equally near level.
    assert np.all(near_tie[mismatch]), f"{mismatch.sum()} non-tie mismatches"
    np.testing.assert_allclose(np.abs(got - w)[mismatch], np.abs(want - w)[mismatch],
                               atol=1e-4 * float(side_scale.max(initial=0)) + 1e-30)
    assert mismatch.mean() < 0.01
    return qt, got, side_scale


@given(fmt=st.sampled_from(ALL), asym=st.booleans(),
       group_size=st.sampled_from([None, 1, 3, 8, 32, 128]),
       k=st.integers(1, 200), n=st.integers(1, 6),
       kind=st.sampled_from(["normal", "heavy", "positive", "negative", "constant", "zeros", "mixed"]),
       scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]), seed=st.integers(0, 2**31 - 1))
def test_matches_numpy_reference(fmt, asym, group_size, k, n, kind, scale_dtype, seed):
    _check_against_reference(_weights(kind, k, n, seed), fmt, group_size, asym, scale_dtype)


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("asym", [True, False])
def test_reference_on_smollm2_shape(fmt, asym):
    # SmolLM2's hidden size 576 = 4.5 groups of 128: the last group is short.
    _check_against_reference(_weights("heavy", 576, 16, 0), fmt, 128, asym, "float16")


@given(fmt=st.sampled_from(ALL), asym=st.booleans(), group_size=st.sampled_from([None, 4, 32, 128]),
       k=st.integers(1, 150), kind=st.sampled_from(["normal", "heavy", "mixed", "positive"]),
       scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]), seed=st.integers(0, 2**31 - 1))
def test_requantizing_is_a_fixed_point(fmt, asym, group_size, k, kind, scale_dtype, seed):
    w = _weights(kind, k, 5, seed)
    qt = aq.quantize(w, fmt, group_size=group_size, asym=asym, scale_dtype=scale_dtype)
    dq = aq.dequantize(qt)
    qt2 = aq.quantize(dq, fmt, group_size=group_size, asym=asym, scale_dtype=scale_dtype)
    if scale_dtype == "float32":  # products of float32 scales round: equal to an ulp
        np.testing.assert_allclose(aq.dequantize(qt2), dq, rtol=1e-6, atol=1e-12)
        return
    # 16-bit scales times small integers/levels are exact in float32: bit-exact fixed point.
    for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(qt2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@given(fmt=st.sampled_from(ALL), asym=st.booleans(), group_size=st.sampled_from([None, 8, 64]),
       kind=st.sampled_from(["normal", "heavy", "mixed", "negative"]),
       scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]), seed=st.integers(0, 2**31 - 1))
def test_error_bound(fmt, asym, group_size, kind, scale_dtype, seed):
    w = _weights(kind, 130, 4, seed)
    f = aq.formats.get_format(fmt)
    _, got, side_scale = _check_against_reference(w, fmt, group_size, asym, scale_dtype)
    # Half the largest level gap times the scale; the scale's rounding toward zero can push the group's
    # extreme past the top level by up to (number of steps) x (one unit of the stored scale: relative for
    # normal scales, the dtype's subnormal spacing for tiny ones, e.g. float16 scales below 2**-14).
    steps = 2**f.bits - 1 if f.is_int else f.divisor
    unit = np.maximum(side_scale * SCALE_EPS[scale_dtype], SCALE_TINY[scale_dtype])
    bound = (side_scale * f.max_gap() / 2 + steps * unit) * (1 + 1e-5) + 1e-30
    if f.is_int and asym:  # the integer zero point shifts the grid by up to half a step
        bound = bound + side_scale * 0.5
    assert np.all(np.abs(got - w) <= bound)


def test_afpq_beats_symmetric_on_skewed_groups():
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.standard_normal((64, 32)) * 0.02, np.abs(rng.standard_normal((64, 32))) * 0.05])
    w = w.astype(np.float32)
    for fmt in ["fp4", "fp3", "nf4", "nf3"]:
        e_asym = float(jnp.mean((aq.fake_quant(w, fmt, group_size=64) - w) ** 2))
        e_sym = float(jnp.mean((aq.fake_quant(w, fmt, group_size=64, asym=False) - w) ** 2))
        assert e_asym < e_sym, fmt


@pytest.mark.parametrize("fmt", ALL)
def test_one_signed_and_zero_groups_give_no_nan(fmt):
    w = np.zeros((256, 4), np.float32)
    w[:, 1] = np.linspace(0.1, 1, 256)
    w[:, 2] = -np.linspace(0.1, 1, 256)
    w[:128, 3] = 1e-30  # underflows any 16-bit scale
    for asym in (True, False):
        qt = aq.quantize(w, fmt, asym=asym)
        for leaf in jax.tree.leaves(qt):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
        dq = np.asarray(aq.dequantize(qt))
        assert np.all(np.isfinite(dq)) and np.all(dq[:, 0] == 0)
        assert np.all(np.sign(dq[:, 1]) >= 0) and np.all(np.sign(dq[:, 2]) <= 0)


def test_zero_encodes_as_the_positive_zero_code():
    fmt = aq.formats.get_format("fp4")
    w = np.array([[0.0], [-0.01], [0.01], [6.0], [-6.0]], np.float32)
    qt = aq.quantize(w, fmt, group_size=None)
    codes = np.asarray(packing.unpack(qt.codes, 4, 5))[:, 0]
    assert codes.tolist() == [fmt.zero_code()] * 3 + [15, 0]


@pytest.mark.parametrize("fmt", ["nf3", "int4", "fp4"])
def test_fake_quant_equals_dequantize_quantize_and_has_identity_gradient(fmt):
    w = jnp.asarray(_weights("heavy", 96, 8, 1))
    np.testing.assert_array_equal(aq.fake_quant(w, fmt, group_size=32), aq.dequantize(aq.quantize(w, fmt, group_size=32)))
    c = jax.random.normal(jax.random.key(0), w.shape)
    g = jax.grad(lambda x: jnp.sum(aq.fake_quant(x, fmt, group_size=32) * c))(w)
    np.testing.assert_array_equal(g, c)
    g2 = jax.jit(jax.grad(lambda x: jnp.sum(aq.fake_quant(x, fmt, asym=False) ** 2)))(w)
    np.testing.assert_allclose(g2, 2 * aq.fake_quant(w, fmt, asym=False), rtol=1e-6)


def test_jit_and_dtype_preserved():
    w = jnp.asarray(_weights("normal", 64, 8, 2)).astype(jnp.bfloat16)
    qt = jax.jit(aq.quantize, static_argnames=("fmt", "group_size", "asym"))(w, "nf4", group_size=32)
    assert qt.dtype == "bfloat16" and qt.shape == (64, 8)
    out = jax.jit(aq.dequantize)(qt)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, aq.dequantize(aq.quantize(w, "nf4", group_size=32)))
    assert aq.dequantize(qt, jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("fmt", ["fp3", "int4"])
def test_leading_axes_broadcast_and_vmap(fmt):
    w = jnp.asarray(_weights("heavy", 3 * 2 * 40, 6, 3).reshape(3, 2, 40, 6))
    qt = aq.quantize(w, fmt, group_size=16)
    qt.validate()
    per_layer = np.stack([[np.asarray(aq.fake_quant(w[i, j], fmt, group_size=16)) for j in range(2)]
                          for i in range(3)])
    np.testing.assert_array_equal(aq.dequantize(qt), per_layer)
    vq = jax.vmap(lambda x: aq.quantize(x, fmt, group_size=16))(w[:, 0])
    vq.validate()
    np.testing.assert_array_equal(aq.dequantize(vq), per_layer[:, 0])
    np.testing.assert_array_equal(jax.vmap(aq.dequantize)(vq), per_layer[:, 0])


def test_pytree_roundtrip_device_put_and_jit_argument():
    qt = aq.quantize(_weights("normal", 100, 12, 4), "nf3", group_size=32)
    leaves, treedef = jax.tree.flatten(qt)
    assert len(leaves) == 3  # codes, s_pos, s_neg; metadata lives in the treedef
    back = jax.tree.unflatten(treedef, leaves)
    assert back == qt or all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), leaves))
    moved = jax.device_put(qt, jax.devices()[0])
    assert isinstance(moved, aq.QuantizedTensor) and moved.format_name == "nf3"
    y = jax.jit(lambda q, x: x @ aq.dequantize(q))(moved, jnp.ones((2, 100)))
    np.testing.assert_allclose(y, jnp.ones((2, 100)) @ aq.dequantize(qt), rtol=1e-6)


@pytest.mark.parametrize("fmt,asym,scale_bytes", [("nf4", True, 4), ("nf4", False, 2), ("int4", True, 3),
                                                   ("int3", False, 2), ("fp3", True, 4), ("int2", True, 3)])
def test_storage_is_honest(fmt, asym, scale_bytes):
    k, n = 576, 64
    qt = aq.quantize(_weights("normal", k, n, 5), fmt, group_size=128, asym=asym)
    bits = aq.formats.get_format(fmt).bits
    groups = -(-k // 128)
    assert qt.codes.size == k * n * bits // 8
    assert qt.nbytes == k * n * bits // 8 + groups * n * scale_bytes
    assert qt.bits_per_weight == pytest.approx(8 * qt.nbytes / (k * n))
    # (4 + 32/128) bits per weight for 4-bit AFPQ at g128 when K is a multiple of 128
    q4 = aq.quantize(_weights("normal", 512, 64, 5), "fp4", group_size=128)
    assert q4.bits_per_weight == pytest.approx(4 + 32 / 128)


@pytest.mark.parametrize("mutate,msg", [
    (dict(codes=jnp.zeros((10, 8), jnp.uint8)), "codes must be uint8"),
    (dict(codes=jnp.zeros((16, 8), jnp.int32)), "codes must be uint8"),
    (dict(scale_neg=None), "scale_neg must be present"),
    (dict(zero=jnp.zeros((1, 8), jnp.uint8)), "zero must be None"),
    (dict(scale=-jnp.ones((1, 8), jnp.float16)), "negative or non-finite"),
    (dict(scale=jnp.full((1, 8), jnp.inf, jnp.float16)), "negative or non-finite"),
    (dict(scale=jnp.ones((2, 8), jnp.float16)), "scale must be"),
    (dict(group_size=0), "group_size"),
    (dict(shape=(32,)), "at least 2 dims"),
])
def test_validate_catches_broken_invariants(mutate, msg):
    import dataclasses
    qt = aq.quantize(_weights("normal", 32, 8, 6), "nf4", group_size=None)
    qt.validate()
    with pytest.raises(ValueError, match=msg):
        dataclasses.replace(qt, **mutate).validate()


@pytest.mark.parametrize("w,kwargs,exc,msg", [
    (np.array([[1.0, np.nan]], np.float32), {}, ValueError, "NaN/inf"),
    (np.array([[1.0], [np.inf]], np.float32), {}, ValueError, "NaN/inf"),
    (np.ones(8, np.float32), {}, ValueError, "at least 2-D"),
    (np.ones((8, 8), np.int32), {}, TypeError, "not floating point"),
    (np.ones((0, 8), np.float32), {}, ValueError, "empty"),
    (np.ones((8, 8), np.float32), {"fmt": "int5"}, ValueError, "unknown format 'int5'"),
    (np.ones((8, 8), np.float32), {"group_size": 0}, ValueError, "positive integer"),
    (np.ones((8, 8), np.float32), {"group_size": -128}, ValueError, "positive integer"),
    (np.ones((8, 8), np.float32), {"group_size": 1.5}, ValueError, "positive integer"),
    (np.ones((8, 8), np.float32), {"group_size": True}, ValueError, "positive integer"),
    (np.ones((8, 8), np.float32), {"group_size": "128"}, ValueError, "positive integer"),
    (np.ones((8, 8), np.float32), {"scale_dtype": "int8"}, ValueError, "scale_dtype"),
    (np.ones((8, 8), np.float32), {"scale_dtype": "foo"}, aq.InputError, "scale_dtype"),
    (np.ones((8, 8), np.float32), {"asym": "no"}, aq.InputError, "asym must be True or False"),
])
def test_bad_inputs(w, kwargs, exc, msg):
    kwargs = {"fmt": "nf4", **kwargs}
    fmt = kwargs.pop("fmt")
    with pytest.raises(exc, match=msg):
        aq.quantize(w, fmt, **kwargs)
    with pytest.raises(exc, match=msg):
        aq.fake_quant(w, fmt, **kwargs)


def test_dequantize_rejects_non_quantized():
    with pytest.raises(TypeError, match="QuantizedTensor"):
        aq.dequantize(np.ones((2, 2)))
    qt = aq.quantize(np.ones((8, 8), np.float32), "nf4")
    for dtype in ("int8", "foo"):
        with pytest.raises(aq.InputError, match="float dtype"):
            aq.dequantize(qt, dtype)


def test_clip_ratios_are_checked():
    w = _weights("normal", 64, 8, 0)
    ones = np.ones((2, 1, 8), np.float32)  # groups of 32
    np.testing.assert_array_equal(aq.quantize(w, "nf4", group_size=32, clip_ratios=(ones, ones)).codes,
                                  aq.quantize(w, "nf4", group_size=32).codes)
    for ratios, msg in [((ones[:1], ones), "needs \\(..., 2, 1, 8\\)"), ((ones[:, 0], ones), "shape \\(2, 8\\)"),
                        ((ones, -ones), "must lie in \\(0, 1\\]"), ((ones, 2 * ones), "from 2 to 2"),
                        (ones, "pair of arrays")]:
        with pytest.raises(aq.InputError, match=msg):
            aq.quantize(w, "nf4", group_size=32, clip_ratios=ratios)
