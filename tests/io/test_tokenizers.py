"""Long-text tokenization: chunks at paragraph boundaries equal the whole text's tokens."""

from pathlib import Path

import numpy as np

import afpq_jax as aq
from tests.support import tiny_hf_weights, write_tiny_llama


def test_chunked_tokenization_matches_whole_text_at_paragraph_boundaries():
    from afpq_jax import tokenize
    weights = tiny_hf_weights(np.random.default_rng(5), tied=True)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok = aq.load_tokenizer(write_tiny_llama(Path(d) / "t.gguf", weights))
    paragraphs = [" ".join(["hello world"] * (3 + i % 5)) for i in range(40)]
    text = "\n\n".join(paragraphs)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    chunked = tokenize(tok, text, chunk_chars=50)
    assert chunked.dtype == np.int32 and chunked.tolist() == whole
