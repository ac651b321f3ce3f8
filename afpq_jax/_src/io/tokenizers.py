"""A model's tokenizer (Hugging Face files in its directory, or the vocabulary inside a GGUF file) and long-text
tokenization. Damaged tokenizer files are one-line `CheckpointError`s naming the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from afpq_jax._src.errors import CheckpointError, InputError
from afpq_jax._src.io.files import read_json_object


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer that belongs to a model path (directory with tokenizer files, or a GGUF file)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found": we never run torch
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file():
        from afpq_jax._src.io import gguf as gguf_io
        meta = gguf_io.read_gguf_tokenizer_metadata(p)
        return PreTrainedTokenizerFast(tokenizer_object=gguf_io.build_tokenizer(meta), **gguf_io.special_tokens(meta))
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{p} has no tokenizer files (tokenizer.json / tokenizer.model); copy them from the "
                              f"original model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (p / name).exists():  # a damaged file is named here, not in a tokenizers / transformers traceback
            read_json_object(p / name)
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # the library's own checks of a user's files: their message, one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read the tokenizer in {p} ({type(e).__name__}: {first}); restore its "
                              f"tokenizer files from the original model") from None


def tokenize(tokenizer, text: str, chunk_chars: int = 100_000) -> np.ndarray:
    """Token ids of a long text as int32, encoded paragraph-aligned chunk by chunk: one fast-tokenizer call on
    a multi-megabyte string holds offsets and masks for every token (measured: +300 MB RSS for 2.3 MB of text)."""
    parts, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        parts.append(np.asarray(tokenizer(text[start:end], add_special_tokens=False)["input_ids"], np.int32))
        start = end
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def bos_prefix(tokenizer) -> int | None:
    """The id the tokenizer puts before every text it encodes (its BOS: Gemma's, LLaMA 3's), else None (SmolLM2,
    Qwen). Windows cut from a long text start with it, as the model saw its documents: Gemma scores its first
    tokens very differently without it."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return int(ids[0]) if len(ids) == 1 and ids[0] == tokenizer.bos_token_id else None


class TextTokenizer:
    """``text -> token ids`` (`tokenize`) with the tokenizer at ``path``, loaded once, when first needed; a
    one-line error when the model has none (``path`` None). ``bos_token_id``: its `bos_prefix` (None without
    a tokenizer)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = path
        self._tokenizer: Any = None

    def _loaded(self) -> Any:
        if self.path is None:
            raise InputError("calibration text needs the model's tokenizer, and this model has none; pass "
                             "Calibration(token_ids=...) or Calibration(random=True)")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def __call__(self, text: str) -> np.ndarray:
        return tokenize(self._loaded(), text)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.path is None else bos_prefix(self._loaded())
