"""`afpq_jax.generate`: greedy and sampled decoding with a KV cache, compiled once per shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax._src import generation
from afpq_jax._src.errors import InputError
from tests.support import FIXTURES


@pytest.fixture(scope="module")
def model():
    return aq.load(FIXTURES / "llama_gqa")


@pytest.fixture(scope="module")
def prompt():
    return np.load(FIXTURES / "llama_gqa" / "generate.npz")["prompt"]


def _ref_allowed(logits: np.ndarray, temperature: float, top_k, top_p) -> np.ndarray:
    """numpy: the renormalized distribution after temperature, top-k, then top-p (most likely token kept)."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k is not None:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        dropped = order[before >= top_p]
        p[dropped] = 0.0
        p /= p.sum()
    return p


@pytest.mark.parametrize("top_k,top_p", [(None, None), (3, None), (None, 0.6), (5, 0.8)])
def test_sampling_follows_the_numpy_distribution(top_k, top_p):
    logits = np.asarray([2.0, 1.5, 1.4, 0.3, -1.0, 0.9, -3.0, 1.45], np.float32)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: generation.sample_logits(jnp.asarray(logits), k, temperature=0.8, top_k=top_k,
                                                        top_p=top_p))(keys)
    freq = np.bincount(np.asarray(draws), minlength=len(logits)) / len(keys)
    want = _ref_allowed(logits, 0.8, top_k, top_p)
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))  # exactly the allowed tokens
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_temperature_zero_and_top_k_one_are_greedy(model, prompt):
    greedy = aq.generate(model, prompt, max_new_tokens=6)  # transformers' greedy continuation (stored fixture)
    np.testing.assert_array_equal(greedy, np.load(FIXTURES / "llama_gqa" / "generate.npz")["generated"][:, :6])
    np.testing.assert_array_equal(aq.generate(model, prompt, max_new_tokens=6, temperature=1.5, top_k=1, key=3),
                                  greedy)


def test_sampling_is_reproducible_for_a_key_and_compiled_once(model, prompt):
    batch = np.concatenate([prompt, prompt[:, ::-1]], axis=0)
    before = generation._decode._cache_size()
    a = aq.generate(model, batch, max_new_tokens=8, temperature=1.0, top_p=0.9, key=7)
    b = aq.generate(model, batch, max_new_tokens=8, temperature=1.3, top_p=0.5, key=7)  # same program
    c = aq.generate(model, batch, max_new_tokens=8, temperature=1.0, top_p=0.9, key=7)
    assert generation._decode._cache_size() - before == 1
    np.testing.assert_array_equal(a, c)
    assert a.shape == (2, 8) and not np.array_equal(a, b)
    d = aq.generate(model, batch, max_new_tokens=8, temperature=1.0, top_p=0.9, key=8)
    assert not np.array_equal(a, d)


def test_stops_when_every_sequence_has_ended(model, prompt):
    greedy = aq.generate(model, prompt, max_new_tokens=8)
    out = aq.generate(model, prompt, max_new_tokens=8, eos_token_id=[int(greedy[0, 2]), 99999])
    np.testing.assert_array_equal(out, greedy[:, :3])


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 10**6}, "context"),
])
def test_bad_generation_arguments(model, prompt, kwargs, message):
    with pytest.raises(InputError, match=message):
        aq.generate(model, prompt, **kwargs)


def test_ragged_or_out_of_vocabulary_prompts_are_refused(model):
    with pytest.raises(InputError, match="equal length"):
        aq.generate(model, [[1, 2, 3], [4, 5]])
    with pytest.raises(InputError, match=r"lie in \[0, 256\)"):
        aq.generate(model, [[1, 2, 256]])
