"""Distillation losses and teacher confidence against numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from afpq_jax._src.errors import InputError
from afpq_jax._src.training import losses


def _np_log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(lp, lq):
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _np_loss(name, s, t, labels, mask, gamma):
    ls, lt = _np_log_softmax(s), _np_log_softmax(t)
    per = {"forward_kl": lambda: _np_kl(lt, ls), "reverse_kl": lambda: _np_kl(ls, lt),
           "cakld": lambda: gamma * _np_kl(ls, lt) + (1 - gamma) * _np_kl(lt, ls),
           "jsd": lambda: 0.5 * _np_kl(lt, np.log((np.exp(lt) + np.exp(ls)) / 2))
           + 0.5 * _np_kl(ls, np.log((np.exp(lt) + np.exp(ls)) / 2)),
           "ce": lambda: -np.take_along_axis(ls, labels[..., None], -1)[..., 0]}[name]()
    return (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("name", losses.LOSSES)
def test_losses_equal_the_numpy_reference(name):
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 5, 11)).astype(np.float32) * 3
    t = rng.standard_normal((2, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    got = losses.distillation_loss(name, jnp.asarray(s), jnp.asarray(t), jnp.asarray(labels), jnp.asarray(mask),
                                   0.3)
    np.testing.assert_allclose(float(got), _np_loss(name, s, t, labels, mask, 0.3), rtol=2e-5, atol=1e-6)
    if name != "ce":  # a divergence of a distribution from itself is 0
        same = losses.distillation_loss(name, jnp.asarray(t), jnp.asarray(t), jnp.asarray(labels),
                                        jnp.asarray(mask), 0.3)
        assert abs(float(same)) < 1e-6


@pytest.mark.parametrize("mode", losses.CONFIDENCE_MODES)
def test_teacher_confidence(mode):
    rng = np.random.default_rng(1)
    t = rng.standard_normal((3, 4, 7)).astype(np.float32) * 2
    labels = rng.integers(0, 7, (3, 4))
    p = np.exp(_np_log_softmax(t))
    want = p.max(-1).mean() if mode == "max_prob" else np.take_along_axis(p, labels[..., None], -1).mean()
    batches = [(jnp.asarray(t[i:i + 1]), jnp.asarray(labels[i:i + 1]), jnp.ones((1, 4))) for i in range(3)]
    got = losses.teacher_confidence(batches, lambda logits: logits, mode)
    assert got == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(InputError, match="unknown"):
        losses.teacher_confidence(batches, lambda x: x, "median")
