"""Perplexity (`afpq_jax._src.evaluation`): against numpy, and its checks of windows, batches and token ids."""

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src.evaluation import perplexity
from afpq_jax._src.models import CausalLM, config_from_hf
from tests.support import FIXTURES, fixture_config


def _numpy_nll(model, windows: np.ndarray) -> float:
    """Mean NLL of each window's tokens 1..L-1 given the ones before, in float64 numpy from the model's logits."""
    logits = np.asarray(model(jnp.asarray(windows)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, windows[:, 1:, None], -1).mean())


def test_perplexity_matches_numpy():
    model = aq.load(FIXTURES / "llama_gqa")
    ids = np.random.default_rng(0).integers(0, 256, 50).astype(np.int32)
    got = perplexity(model, ids, seq_len=12, batch_size=2, progress=False)
    nll = _numpy_nll(model, ids[:48].reshape(4, 12))
    assert got["windows"] == 4 and got["tokens"] == 44
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:5], seq_len=12, progress=False)


def test_perplexity_with_bos_scores_every_text_token_after_it():
    """Gemma's protocol: each window is BOS + 11 text tokens, and all 11 are predicted (50 tokens: 4 windows)."""
    model = aq.load(FIXTURES / "gemma3")
    ids = np.random.default_rng(1).integers(3, 256, 50).astype(np.int32)
    got = perplexity(model, ids, seq_len=12, batch_size=3, progress=False, bos_token_id=1)
    nll = _numpy_nll(model, np.concatenate([np.ones((4, 1), np.int32), ids[:44].reshape(4, 11)], axis=1))
    assert got["windows"] == 4 and got["tokens"] == 44
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_calibration_windows_start_with_bos_when_given():
    from afpq_jax._src.calibration.data import sample_windows
    ids = np.arange(10, 110, dtype=np.int32)
    plain, with_bos = sample_windows(ids, 5, 8, seed=3), sample_windows(ids, 5, 8, seed=3, bos_token_id=2)
    assert plain.shape == with_bos.shape == (5, 8) and np.all(with_bos[:, 0] == 2)
    for row in (*plain, *with_bos[:, 1:]):  # consecutive text tokens
        assert np.all(np.diff(row) == 1) and row[0] >= 10


def test_library_perplexity_refuses_bad_windows_and_batches():
    model = aq.load(FIXTURES / "llama_gqa")  # context: 128 positions
    ids = np.random.default_rng(0).integers(0, 256, 300).astype(np.int32)
    for kw, message in [(dict(batch_size=0), "batch_size must be a positive integer"),
                        (dict(batch_size=-1), "batch_size must be a positive integer"),
                        (dict(max_windows=0), "max_windows must be a positive integer"),
                        (dict(max_windows=-1), "max_windows must be a positive integer"),
                        (dict(seq_len=0), "seq_len must be an integer of at least 2"),
                        (dict(seq_len=1), "seq_len must be an integer of at least 2"),
                        (dict(seq_len=129), "exceeds the model's context of 128 tokens")]:
        with pytest.raises(aq.InputError, match=re.escape(message)):
            perplexity(model, ids, progress=False, **kw)
    assert perplexity(model, ids, seq_len=128, max_windows=1, progress=False)["windows"] == 1


# ---- perplexity checks token ids like the model's forward pass -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    return CausalLM(config_from_hf(fixture_config()))  # vocab 256


@pytest.mark.parametrize("bad,error,message", [
    (300, InputError, r"token ids must lie in \[0, 256\), got \[0, 300\]"),
    (-1, InputError, r"token ids must lie in \[0, 256\), got \[-1, "),
    (2**32 + 5, InputError, r"token ids must lie in \[0, 256\)"),  # int32 wrapped it to 5
])
def test_perplexity_refuses_out_of_vocabulary_ids(tiny_model, bad, error, message):
    ids = np.arange(16, dtype=np.int64) % 200
    ids[5] = bad
    with pytest.raises(error, match=message):
        perplexity(tiny_model, ids, seq_len=8, progress=False)


def test_perplexity_refuses_float_ids(tiny_model):
    with pytest.raises(ArgumentTypeError, match=r"token_ids must be integer token ids, got dtype float64"):
        perplexity(tiny_model, np.arange(16) + 0.5, seq_len=8, progress=False)
    with pytest.raises(InputError, match="fewer than one window"):  # an empty list is numpy float64
        perplexity(tiny_model, [], seq_len=8, progress=False)
