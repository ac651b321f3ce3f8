"""The two-sided clipping search: it never increases the error and finds the grid minimum."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import afpq_jax as aq
from afpq_jax._src.algorithms.clip import clip_search, group_output_error
from tests import reference as ref
from tests.support import FORMATS


@settings(max_examples=20)  # as above: each new (format, scheme, group) compiles
@given(fmt=st.sampled_from(FORMATS), asym=st.booleans(), g=st.sampled_from([None, 16, 64]),
       seed=st.integers(0, 1000))
def test_clip_search_never_increases_its_error(fmt, asym, g, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (80, 6)) * 0.05).astype(np.float32)
    x = rng.standard_normal((64, 80)).astype(np.float32)
    ratios, err = clip_search(w, x, fmt, group_size=g, asym=asym)
    qt = aq.quantize(w, fmt, group_size=g, asym=asym, clip_ratios=ratios)
    clipped = group_output_error(w, aq.dequantize(qt), x, g)
    plain = group_output_error(w, aq.fake_quant(w, fmt, group_size=g, asym=asym), x, g)
    assert np.all(clipped <= plain * (1 + 1e-5) + 1e-12)
    np.testing.assert_allclose(np.asarray(err), clipped, rtol=1e-3, atol=1e-9)
    r_neg, r_pos = (np.asarray(r) for r in ratios)
    assert np.all((r_neg >= 0.55 - 1e-6) & (r_neg <= 1)) and np.all((r_pos >= 0.55 - 1e-6) & (r_pos <= 1))
    if not asym:
        np.testing.assert_array_equal(r_neg, r_pos)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("asym", [True, False])
def test_clip_search_finds_the_grid_minimum(fmt, asym):
    """Exhaustive float64 numpy search over the same grid (the separable AFPQ path must find the same minimum)."""
    rng = np.random.default_rng(3)
    k, n, g, t = 96, 40, 32, 48
    w = (rng.standard_t(3, (k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32)
    (r_neg, r_pos), err = clip_search(w, x, fmt, group_size=g, asym=asym)
    grid = 1.0 - 0.05 * np.arange(10)
    pairs = [(a, b) for a in grid for b in grid] if asym else [(a, a) for a in grid]
    best = np.full((k // g, n), np.inf)
    for a, b in pairs:
        for gi in range(k // g):
            rows = w[gi * g:(gi + 1) * g]
            lo, hi = rows.min(0) * np.float32(a), rows.max(0) * np.float32(b)
            dq, _, _ = ref.ref_round(rows, ref.ref_params(lo, hi, fmt, asym), fmt)
            e = x[:, gi * g:(gi + 1) * g].astype(np.float64) @ (rows - dq).astype(np.float64)
            best[gi] = np.minimum(best[gi], np.mean(e * e, axis=0))
    np.testing.assert_allclose(np.asarray(err), best, rtol=2e-3, atol=1e-9)
    qt = aq.quantize(w, fmt, group_size=g, asym=asym, clip_ratios=(r_neg, r_pos))
    np.testing.assert_allclose(group_output_error(w, aq.dequantize(qt), x, g), best, rtol=2e-3, atol=1e-9)
