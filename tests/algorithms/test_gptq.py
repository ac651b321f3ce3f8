"""GPTQ against the numpy reference: Hessians, the inverse factor, damping, input checks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import afpq_jax as aq
from afpq_jax._src.algorithms import gptq
from afpq_jax._src.algorithms.clip import clip_search
from afpq_jax._src.algorithms.gptq import accumulate_hessian, gptq_quantize, hessian_inverse_factor, output_mse
from tests import reference as ref
from tests.support import FORMATS, indefinite_hessian


def _correlated_inputs(k, t, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((t, k)) @ rng.standard_normal((k, k)) * 0.2 + rng.standard_normal(k)).astype(
        np.float32)


# g16 in 32-row blocks: two 16-row sub-blocks per block; g64 (K = 128): 64-row blocks of two 32-row sub-blocks
# that share their group's parameters; g37 in 111-row blocks (block_size 128): no small divisor, one sub-block
# per group, each taking its own parameters.
@pytest.mark.parametrize("fmt,asym,g,k,block", [("nf3", True, 16, 64, 32), ("int3", True, 32, 64, 32),
                                                ("fp3_e2m0", True, 16, 64, 32), ("int4", False, 16, 64, 32),
                                                ("nf4", False, 32, 64, 32), ("nf3", True, 64, 128, 32),
                                                ("int4", True, 37, 111, 128)])
def test_gptq_matches_numpy_reference(fmt, asym, g, k, block):
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, (k, 12)) * 0.05).astype(np.float32)
    x = _correlated_inputs(k, 512, 1)
    h, _ = accumulate_hessian(None, jnp.asarray(x), 0)
    got = np.asarray(aq.dequantize(gptq_quantize(w, h, fmt, group_size=g, asym=asym, block_size=block)), np.float64)
    want = ref.ref_gptq(w, np.asarray(h, np.float64), fmt, g, asym, block=block)
    # float32 vs float64 error propagation can flip a rare near-tie and everything downstream of it in that row
    rows_equal = np.mean(np.all(np.isclose(got, want, rtol=1e-4, atol=1e-6), axis=0))
    assert rows_equal >= 0.75, rows_equal
    assert output_mse(w, got, x) == pytest.approx(output_mse(w, want, x), rel=0.05)


@pytest.mark.parametrize("k,damp", [(7, 0.0), (96, 0.01), (300, 0.01)])
def test_hessian_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse(k, damp):
    """Against float64 numpy done AutoGPTQ's way (invert, then factor): the same triangle, to float32 accuracy
    scaled by H's condition number."""
    x = _correlated_inputs(k, 4 * k, 5)
    h = (x.T.astype(np.float64) @ x) * (2.0 / len(x))
    got = np.asarray(hessian_inverse_factor(jnp.asarray(h, jnp.float32), damp), np.float64)
    damped = h + damp * np.mean(np.diag(h)) * np.eye(k)
    want = np.linalg.cholesky(np.linalg.inv(damped)).T
    assert np.all(np.tril(got, -1) == 0) and np.all(np.diag(got) > 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-8 * np.linalg.cond(damped) * np.abs(want).max())


# Each new (format, scheme, group, shape) compiles (~1 s): 20 examples, not the profile's 40, keep the suite short.
@settings(max_examples=20)
@given(fmt=st.sampled_from(FORMATS), asym=st.booleans(), g=st.sampled_from([None, 8, 32, 128]),
       k=st.sampled_from([8, 45, 100]), seed=st.integers(0, 1000))  # few shapes: each new shape compiles
def test_gptq_with_diagonal_hessian_is_rtn(fmt, asym, g, k, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, 5)) * 0.1).astype(np.float32)
    h = jnp.diag(jnp.asarray(rng.uniform(0.1, 3.0, k), jnp.float32))
    qt = gptq_quantize(w, h, fmt, group_size=g, asym=asym, block_size=32)
    qt.validate()
    np.testing.assert_array_equal(aq.dequantize(qt), aq.fake_quant(w, fmt, group_size=g, asym=asym))


def test_gptq_and_clip_search_check_their_inputs():
    w = np.ones((16, 4), np.float32)
    h = jnp.eye(16)
    with_nan = w.copy()
    with_nan[0, 0] = np.nan
    for kwargs, exc, msg in [({"group_size": 0}, aq.InputError, "group_size"),
                             ({"block_size": 0}, aq.InputError, "block_size"),
                             ({"damp": -1.0}, aq.InputError, "damp"),
                             ({"scale_dtype": "int8"}, aq.InputError, "scale_dtype"),
                             ({"kernel": with_nan}, aq.InputError, "NaN/inf"),
                             ({"kernel": w[None]}, aq.InputError, "2-D kernel"),
                             ({"kernel": w.astype(np.int32)}, TypeError, "not floating point")]:
        kernel = kwargs.pop("kernel", w)
        with pytest.raises(exc, match=msg):
            gptq_quantize(kernel, h, "nf4", **{"group_size": 8, **kwargs})
    with pytest.raises(aq.InputError, match="100 features, the kernel expects 16"):
        clip_search(w, np.ones((32, 100), np.float32), "nf4", group_size=8)
    with pytest.raises(aq.InputError, match="group_size"):
        clip_search(w, np.ones((32, 16), np.float32), "nf4", group_size=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    rng = np.random.default_rng(2)
    w = (rng.standard_t(4, (96, 32)) * 0.05).astype(np.float32)
    x = _correlated_inputs(96, 2048, 3)
    h, _ = accumulate_hessian(None, jnp.asarray(x), 0)
    for fmt in ["int3", "nf3", "fp3"]:
        qt = gptq_quantize(w, h, fmt, group_size=32, act_order=act_order)
        qt.validate()
        assert output_mse(w, aq.dequantize(qt), x) < 0.8 * output_mse(w, aq.fake_quant(w, fmt, group_size=32), x)


def test_hessian_accumulation_is_a_running_mean():
    x = _correlated_inputs(16, 300, 4)
    h, n = None, 0
    for part in np.array_split(x, 7):
        h, n = accumulate_hessian(h, jnp.asarray(part), n)
    np.testing.assert_allclose(h, 2 * x.T.astype(np.float64) @ x / len(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_raises_damping_until_the_hessian_is_positive_definite(act_order):
    w = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    h = indefinite_hessian(32, -0.01)  # damp 0.01 x mean(diag) ~ 0.01 does not lift it; ~0.02 does
    assert np.isnan(np.asarray(gptq.hessian_inverse_factor(jnp.asarray(h, jnp.float32), 0.01))).any()
    qt = gptq.gptq_quantize(w, h, "int4", group_size=16, act_order=act_order)
    qt.validate()
    assert np.all(np.isfinite(np.asarray(aq.dequantize(qt))))
    # the first damping of the schedule (0.01 + k * 0.0025) that lifts the -0.01 eigenvalue is 0.0125
    assert np.linalg.eigvalsh(h + 0.0125 * np.mean(np.diag(h)) * np.eye(32)).min() > 2e-3
    want = gptq.gptq_quantize(w, h, "int4", group_size=16, act_order=act_order, damp=0.0125)
    np.testing.assert_array_equal(qt.codes, want.codes)
    np.testing.assert_array_equal(qt.scale, want.scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_names_the_layer_when_no_damping_helps(act_order):
    w = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    h = indefinite_hessian(32, -5.0)
    with pytest.raises(aq.QuantizationError, match="layers.3.mlp.down_proj is not positive definite"):
        gptq.gptq_quantize(w, h, "nf3", group_size=16, act_order=act_order, name="layers.3.mlp.down_proj")


def test_damping_schedule():
    assert gptq.damping_schedule(0.01, 0.0025, 0.02) == pytest.approx([0.01, 0.0125, 0.015, 0.0175, 0.02])
    assert gptq.damping_schedule(0.5, 0.25, 1.0) == pytest.approx([0.5, 0.75, 1.0])
