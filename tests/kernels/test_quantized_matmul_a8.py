"""`quantized_matmul_a8` (W·A8): the XLA integer path against float64, the kernels against it, lowering, dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import afpq_jax
import afpq_jax as aq
from afpq_jax._src import quantizer
from afpq_jax._src.kernels.quantized_matmul_a8.xla import group_sums
from afpq_jax.kernels import BlockConfig, Problem, integer_weight, quantize_activations, quantized_matmul_a8
from tests.kernels.support import (INTERPRET, TPU_KINDS, abstract_weight, custom_call_operands, input_fusion_flags,
                                   make_weight, make_x, on_tpu)
from tests.support import emulated_int8_matmul

W8_FORMATS = [("int4", True), ("int4", False), ("fp4_e2m1", True), ("fp4_e2m1", False), ("fp3_e2m0", True),
              ("int8", False)]


@pytest.mark.parametrize("fmt,asym", W8_FORMATS)
@pytest.mark.parametrize("group_size", [32, None, 48])  # 48: K=100 leaves a short last group
@pytest.mark.parametrize("static", [False, True])
def test_integer_path_equals_float64_emulation(fmt, asym, group_size, static):
    rng = np.random.default_rng(hash((fmt, asym, group_size)) % 2**32)
    k, n = 100, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((3, 5, k)) * 4).astype(np.float32)
    x[0, 1] = 0.0  # an all-zero token
    qt = aq.quantize(w, fmt, group_size=group_size, asym=asym)
    scale = np.float32(0.03) if static else None  # static: some values saturate at +-127
    y = np.asarray(quantized_matmul_a8(jnp.asarray(x), qt, None if scale is None else jnp.float32(scale)),
                   np.float64)
    ref, bound = emulated_int8_matmul(x.reshape(-1, k), qt, scale)
    # integers are exact; only the float32 epilogue (scales, sum over groups) rounds
    assert y.shape == (3, 5, n)
    np.testing.assert_array_less(np.abs(y.reshape(-1, n) - ref), 4e-7 * bound + 1e-30)


@pytest.mark.parametrize("fmt,asym", W8_FORMATS)
def test_group_sums_are_exact_integers(fmt, asym):
    rng = np.random.default_rng(1)
    k, n, g = 96, 16, 32
    qt = aq.quantize(rng.standard_normal((k, n)).astype(np.float32) * 3, fmt, group_size=g, asym=asym)
    parts, scales, zero = integer_weight(qt)
    xq = rng.integers(-127, 128, (4, k)).astype(np.int8)
    xg = jnp.asarray(xq).reshape(4, k // g, g)
    mult = qt.format.int8_multiplier()
    dq = np.asarray(aq.dequantize(qt, jnp.float32), np.float64).reshape(k // g, g, n)
    total = np.zeros((4, k // g, n))
    for w, s in zip(parts, scales):
        p = np.asarray(group_sums(xg, w))
        ref = np.einsum("mgk,gkn->mgn", xq.reshape(4, k // g, g).astype(np.int64), np.asarray(w, np.int64))
        np.testing.assert_array_equal(p, ref)
        if zero is not None:
            p = p - np.asarray(zero)[None] * xq.reshape(4, k // g, g).astype(np.int64).sum(-1)[:, :, None]
        total += p * np.asarray(s, np.float64)[None]
    # the parts with their scales give back the dequantized weight's group sums
    np.testing.assert_allclose(total, np.einsum("mgk,gkn->mgn", xq.reshape(4, k // g, g).astype(np.float64), dq),
                               rtol=1e-6, atol=1e-6)
    assert mult == {"int4": 1, "int8": 1, "fp4_e2m1": 2, "fp3_e2m0": 1}[fmt]


@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40),
       st.floats(1e-3, 10.0))
def test_activation_codes_match_numpy(values, scale):
    x = np.asarray(values, np.float32)
    s = np.float32(scale)
    got = np.asarray(quantize_activations(jnp.asarray(x), jnp.float32(s)))
    want = np.clip(np.round(x * (np.float32(1) / s)), -127, 127).astype(np.int8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("impl", ["mosaic_tpu", "triton"])
def test_a8_kernels_differentiate_like_xla(impl):
    from afpq_jax.kernels import quantized_matmul_a8
    qt = make_weight("int4", 64, True, 256, 128)
    x, c = make_x((4, 256), jnp.float32), make_x((4, 128), jnp.float32, seed=2)

    def grad(impl, interpret):
        return jax.grad(lambda x: jnp.sum(quantized_matmul_a8(x, qt, implementation=impl, interpret=interpret) * c))(x)

    np.testing.assert_array_equal(np.asarray(grad(impl, INTERPRET)), np.asarray(grad("xla", False)))


# ---------------------------------------------------------------------------------------------------------
# W·A8 (`quantized_matmul_a8`): the Triton kernel against the XLA integer path, lowering, dispatch.

A8_FORMATS = (("int4", True), ("int4", False), ("fp4_e2m1", True), ("fp4_e2m1", False), ("int8", False))


def _a8(impl, x, qt, scale, config=None):
    from afpq_jax.kernels import quantized_matmul_a8
    return jax.jit(lambda x, q, s: quantized_matmul_a8(x, q, s, implementation=impl, config=config,
                                                       interpret=INTERPRET))(x, qt, scale)


_A8_SHAPES = [((3, 7, 200), 80, jnp.bfloat16, 32),  # M, N and K tails
              ((1, 256), 64, jnp.float32, 128),  # decode
              ((5, 96), 48, jnp.bfloat16, None)]  # per-channel
# every format on the tail shape; the asymmetric formats (two scales / zero points) on the others
A8_CASES = ([(f, a, st, *_A8_SHAPES[0], False) for f, a in A8_FORMATS for st in (False, True)]
            + [(f, True, st, *shape, False) for shape in _A8_SHAPES[1:] for f in ("int4", "fp4_e2m1")
               for st in (False, True)]
            # integer group scales: one int8 tile per slot, one int32 accumulator over K
            + [(f, True, False, *_A8_SHAPES[0], True) for f in ("int4", "fp4_e2m1")]
            + [("fp4_e2m1", False, True, *_A8_SHAPES[0], True), ("fp4_e2m1", True, False, *_A8_SHAPES[2], True)])


@pytest.mark.parametrize("impl", ["mosaic_tpu", "triton"])
@pytest.mark.parametrize("fmt,asym,static,x_shape,n,dtype,group,integer_scales", A8_CASES,
                         ids=lambda v: str(v) if not isinstance(v, tuple) else "x".join(map(str, v)))
def test_a8_kernels_match_xla(impl, fmt, asym, static, x_shape, n, dtype, group, integer_scales):
    qt = make_weight(fmt, group, asym, x_shape[-1], n, integer_scales=integer_scales)
    x = make_x(x_shape, dtype) * 3
    scale = jnp.float32(0.02) if static else None  # static: some activations saturate at +-127
    # Triton decode runs with 64-row K tiles: two tiles per group (int32 sums carried across tiles, then flushed)
    config = BlockConfig(block_k=64) if group == 128 and impl == "triton" else None
    y, ref = _a8(impl, x, qt, scale, config), _a8("xla", x, qt, scale)
    assert y.shape == ref.shape == (*x_shape[:-1], n) and y.dtype == ref.dtype == x.dtype
    # the int32 group sums are identical; only the float epilogue's order (and the output rounding) differs
    w = np.abs(np.asarray(quantizer.dequantize(qt, jnp.float32)))
    bound = 2e-6 * (np.abs(np.asarray(x, np.float32)).reshape(-1, x_shape[-1]) @ w)
    eps_out = 0.0 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    y32, r32 = (np.asarray(v, np.float32).reshape(-1, n) for v in (y, ref))
    assert np.all(np.abs(y32 - r32) <= bound + eps_out * np.abs(r32) + 1e-30)


@pytest.mark.parametrize("fmt,asym,integer_scales", [("int4", True, False), ("fp4_e2m1", True, False),
                                                     ("fp4_e2m1", True, True)])
def test_a8_triton_split_k_matches_xla(fmt, asym, integer_scales):
    """Decode's split-K: 6 K tiles of 64 rows in 2 splits of 3, so a 128-row group is cut by the split
    boundary (its integer sums scaled in both parts); 4 splits of 2 tiles; the default's split at M = 1."""
    from afpq_jax._src.kernels.quantized_matmul_a8 import api as a8_api
    qt = make_weight(fmt, 128, asym, 384, 80, integer_scales=integer_scales)
    x = make_x((1, 384), jnp.bfloat16) * 3
    ref = np.asarray(_a8("xla", x, qt, None), np.float32)
    w = np.abs(np.asarray(quantizer.dequantize(qt, jnp.float32)))
    bound = 2e-6 * (np.abs(np.asarray(x, np.float32)) @ w) + float(jnp.finfo(jnp.bfloat16).eps) * np.abs(ref)
    for split in (2, 4):
        y = np.asarray(_a8("triton", x, qt, None, BlockConfig(block_k=64, split_k=split)), np.float32)
        assert np.all(np.abs(y - ref) <= bound + 1e-30), split
    prob = Problem.create((1, 4096), jnp.bfloat16, abstract_weight(fmt, 128, asym, 4096, 4096, integer_scales))
    assert a8_api.resolve("triton", prob, None).split_k >= 4  # 64 output tiles alone would leave SMs idle


@pytest.mark.parametrize("asym,integer_scales", [(True, False), (False, False), (True, True)])
def test_a8_triton_arithmetic_levels(asym, integer_scales):
    # FP4 integer levels by E2M1 arithmetic (lookup=False) instead of the table load: the same int32 sums.
    qt = make_weight("fp4_e2m1", 32, asym, 200, 80, integer_scales=integer_scales)
    x = make_x((3, 7, 200), jnp.bfloat16) * 3
    y = _a8("triton", x, qt, None, BlockConfig(lookup=False))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(_a8("triton", x, qt, None), np.float32))
    ref = np.asarray(_a8("xla", x, qt, None), np.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt,asym,integer_scales", [(f, a, False) for f, a in A8_FORMATS[:4]]
                         + [("int4", True, True), ("fp4_e2m1", True, True)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m", [1, 128])
def test_a8_triton_lowers(fmt, asym, integer_scales, static, m, verified_triton_modules):
    from afpq_jax.kernels import quantized_matmul_a8
    avals = (jax.ShapeDtypeStruct((m, 512), jnp.bfloat16),
             abstract_weight(fmt, 128, asym, 512, 256, integer_scales))
    f = lambda x, q: quantized_matmul_a8(x, q, jnp.float32(0.05) if static else None,  # noqa: E731
                                         implementation="triton")
    text = jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and len(verified_triton_modules) == 1


@pytest.mark.parametrize("kind", TPU_KINDS)
@pytest.mark.parametrize("case", [("int4", 128, True, 1, 4096, 4096, False),
                                  ("fp4_e2m1", 128, True, 128, 576, 1536, False),
                                  ("fp4_e2m1", 32, False, 16, 1024, 256, False), ("int8", None, False, 8, 512, 256, False),
                                  ("int4", 128, True, 1, 4096, 4096, True), ("fp4_e2m1", 32, True, 16, 1024, 256, True)],
                         ids=lambda c: f"{c[0]}-g{c[1]}-m{c[3]}{'-intscales' if c[6] else ''}")
@pytest.mark.parametrize("static", [False, True])
def test_a8_mosaic_tpu_lowers(kind, case, static):
    from afpq_jax.kernels import quantized_matmul_a8
    fmt, group, asym, m, k, n, integer_scales = case
    avals = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), abstract_weight(fmt, group, asym, k, n, integer_scales))
    f = lambda x, q: quantized_matmul_a8(x, q, jnp.float32(0.05) if static else None,  # noqa: E731
                                         implementation="mosaic_tpu")
    with on_tpu(kind):
        text = jax.jit(f).trace(*avals).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text
    weights = 2 + int(asym)  # codes, scale, and s_neg or zero points; then the channel / input scale broadcasts
    assert input_fusion_flags(text) == ["true"] + ["false"] * weights + ["true"] * (int(integer_scales) + int(static))
    assert custom_call_operands(text) == 1 + weights + int(integer_scales) + int(static)


def test_a8_dispatch_and_declines():
    from afpq_jax.kernels import quantized_matmul_a8
    from afpq_jax._src.kernels.quantized_matmul_a8 import why_not as a8_why_not
    x = make_x((2, 64), jnp.float32)
    qt = make_weight("int4", 32, True, 64, 32)
    np.testing.assert_array_equal(quantized_matmul_a8(x, qt), _a8("xla", x, qt, None))  # CPU: the XLA path
    assert a8_why_not("triton", x, qt) is None
    small = make_weight("int3", 32, True, 64, 32)  # 3-bit: 8 rows per byte, a 32-row tile is under tl.dot's minimum
    assert "power of two" in a8_why_not("triton", x, small)
    assert "3-bit" in a8_why_not("mosaic_tpu", x, small)
    with pytest.raises(NotImplementedError, match="does not support"):
        quantized_matmul_a8(x, small, implementation="triton", interpret=True)
    nf = make_weight("nf4", 32, True, 64, 32)
    assert "no integer levels" in a8_why_not("triton", x, nf)
    with pytest.raises(afpq_jax.InputError, match="no exact int8 representation"):
        quantized_matmul_a8(x, nf)
    with pytest.raises(afpq_jax.InputError, match="scalar"):
        quantized_matmul_a8(x, qt, jnp.ones((2,)))
    for scale in (0.0, -1.0):
        with pytest.raises(afpq_jax.InputError, match="must be positive"):
            quantized_matmul_a8(x, qt, jnp.float32(scale))
    with pytest.raises(TypeError, match="float activations"):
        quantized_matmul_a8(x.astype(jnp.int32), qt)
