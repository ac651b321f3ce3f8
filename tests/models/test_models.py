"""Our Flax NNX model of every family (LLaMA, BLOOM, Gemma 3, Qwen 2 / 3) against PyTorch transformers' logits,
the KV cache (sliding windows included) and token id checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import afpq_jax as aq
from tests.support import FIXTURES, logits

TORCH_FIXTURES = ["llama_gqa", "llama_tied_theta", "llama3_rope", "llama_sharded", "bloom", "gemma3", "qwen2",
                  "qwen3"]


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_logits_match_pytorch_transformers(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    model = aq.load(FIXTURES / name)
    got = logits(model, ref["input_ids"])
    assert got.dtype == np.float32 and got.shape == ref["logits"].shape
    np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=1e-4)


def test_hf_flax_msgpack_weights_match():
    ref = np.load(FIXTURES / "llama_gqa" / "reference.npz")  # same weights, transformers-4 Flax format
    model = aq.load(FIXTURES / "llama_flax")
    np.testing.assert_allclose(logits(model, ref["input_ids"]), ref["logits"], atol=1e-4)


@pytest.mark.parametrize("name", ["llama_gqa", "bloom", "gemma3"])
def test_kv_cache_matches_full_forward(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    model = aq.load(FIXTURES / name)
    ids = jnp.asarray(ref["input_ids"])
    cache = model.init_cache(ids.shape[0], ids.shape[1] + 4)
    step = nnx.jit(lambda m, x, c, start: m.forward_with_cache(x, c, start))  # one program a shape, not an op
    chunks = []
    for start, stop in [(0, 7), (7, 8), (8, ids.shape[1])]:  # prefill, one token, the rest
        out, cache = step(model, ids[:, start:stop], cache, start)
        chunks.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), ref["logits"], atol=1e-4)


@pytest.mark.parametrize("name", ["llama_gqa", "bloom", "gemma3"])
def test_chunked_causal_attention_equals_one_whole_window(name):
    # 300 tokens: cache-free attention runs 2 query chunks (256, 44), each against only the keys up to its
    # last query; the cached path attends one whole masked window. Both must give the same logits.
    from afpq_jax._src.models.transformer import query_chunk
    model = aq.load(FIXTURES / name)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, model.cfg.vocab_size, (2, 300)), jnp.int32)
    assert query_chunk(300) < 300 and 300 % query_chunk(300)
    whole, _ = nnx.jit(lambda m, x: m.forward_with_cache(x, m.init_cache(2, 300), 0))(model, ids)
    chunked = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=0, atol=2e-5)


def test_family_configs_read_what_transformers_built():
    """The features each fixture switches on come from its config.json (a misread flag would still give
    plausible logits on a model whose feature happens to be the identity)."""
    g = aq.load(FIXTURES / "gemma3").cfg
    assert (g.mlp, g.qk_norm, g.norm_plus_one, g.sandwich_norms, g.embed_scale) == ("geglu", True, True, True, True)
    assert [g.window(i) for i in range(3)] == [6, None, 6] and g.rope_local_theta == 1e4
    assert g.query_pre_attn_scalar == 24 and g.final_softcap == 4.0 and dict(g.rope_scaling)["factor"] == 2.0
    q2, q3 = aq.load(FIXTURES / "qwen2").cfg, aq.load(FIXTURES / "qwen3").cfg
    assert (q2.attn_bias, q2.attn_out_bias, q2.qk_norm, q2.layer_types) == (True, False, False, None)
    assert (q3.attn_bias, q3.qk_norm, q3.head_dim, q3.tie_embeddings) == (False, True, 32, True)
    assert [q3.window(i) for i in range(2)] == [None, 8]


def test_sliding_window_generation_matches_pytorch():
    """Gemma 3's greedy tokens from transformers' generate: 12 past a 5-token prompt through a window of 6, so
    the sliding layers' cache must hide the keys that left the window."""
    ref = np.load(FIXTURES / "gemma3" / "generate.npz")
    tokens = aq.generate(aq.load(FIXTURES / "gemma3"), ref["prompt"], max_new_tokens=12, temperature=0.0)
    np.testing.assert_array_equal(tokens, ref["generated"])


def test_causal_lm_checks_its_token_ids():
    model = aq.load(FIXTURES / "llama_gqa")
    vocab = model.cfg.vocab_size
    for ids, exc, msg in [(np.asarray([[1, vocab]]), aq.InputError, "must lie in"),  # gave NaN logits
                          (np.asarray([[-1, 2]]), aq.InputError, "must lie in"),  # wrapped around
                          (np.asarray([1, 2, 3]), aq.InputError, "batch, seq"),
                          (np.asarray([[1.0, 2.0]]), TypeError, "integer token ids")]:
        with pytest.raises(exc, match=msg):
            model(ids)
    jax.jit(lambda m, ids: m(ids))(model, jnp.asarray([[1, 2]]))  # traced ids: shape and dtype checks only
