"""AWQ: scale folding keeps the float logits, the scale search, bf16 folds."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax import QuantScheme
from afpq_jax._src.algorithms import awq
from tests.support import FIXTURES, foldable_float_model, logits


@pytest.mark.parametrize("fixture", ["llama_tied_theta", "llama_gqa", "bloom", "gemma3", "qwen3"])
def test_awq_scale_folding_keeps_float_logits(fixture):
    model, cfg, ref_npz = foldable_float_model(fixture)
    rng = np.random.default_rng(0)
    groups = awq.scaling_groups(cfg)
    assert len(groups) == (4 if cfg.num_kv_heads == cfg.num_heads and not cfg.fused_qkv else 3)
    for layer in model.layers:
        for group in groups:
            n_in = awq.get_path(layer, group.layers[0]).in_features
            awq.fold_scale(layer, group, jnp.asarray(rng.uniform(0.25, 4.0, n_in), jnp.float32))
    np.testing.assert_allclose(logits(model, ref_npz["input_ids"]), ref_npz["logits"], atol=1e-4)


def test_awq_search_includes_rtn_and_prefers_it_only_if_nothing_is_better():
    model = aq.load(FIXTURES / "llama_tied_theta")
    cfg = model.cfg
    block = model.layers[0]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, cfg.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    h = block.post_attn_norm(x)
    group = [g for g in awq.scaling_groups(cfg) if g.inspect == "mlp"][0]
    x_mean = jnp.mean(jnp.abs(h.reshape(-1, h.shape[-1])), axis=0)
    s, alpha, losses = awq.search_scale(block, group, h, pos, x_mean, QuantScheme.create("int3", group_size=32))
    assert losses[0] >= losses.min() and alpha == pytest.approx(np.argmin(losses) / 20)
    assert s.shape == (cfg.hidden_size,) and np.all(np.isfinite(np.asarray(s)))


def test_awq_fold_rounds_the_scale_once_in_bf16():
    model = aq.load(FIXTURES / "llama_gqa", dtype="bfloat16")
    block = model.layers[0]
    group = [g for g in awq.scaling_groups(model.cfg) if g.prev == "post_attn_norm"][0]
    s = jnp.asarray(np.random.default_rng(0).uniform(0.3, 3.0, model.cfg.hidden_size), jnp.float32)
    s_used = s.astype(jnp.bfloat16).astype(jnp.float32)
    assert not np.array_equal(np.asarray(s_used), np.asarray(s))  # the scale is not bf16-exact
    kernels = {n: awq.get_path(block, n).kernel.get_value() for n in group.layers}
    norm = block.post_attn_norm.weight.get_value()
    np.testing.assert_array_equal(np.asarray(awq.fold_scale(block, group, s)), np.asarray(s_used))
    for n, k in kernels.items():
        got = awq.get_path(block, n).kernel.get_value()
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray((k.astype(jnp.float32) * s_used[:, None]).astype(jnp.bfloat16),
                                                 np.float32))
    got = block.post_attn_norm.weight.get_value()
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray((norm.astype(jnp.float32) / s_used).astype(jnp.bfloat16), np.float32))
