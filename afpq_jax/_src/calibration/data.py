"""Calibration data: where the windows come from and how forwards batch them (`Calibration`), and window sampling.

A calibrated conversion draws ``samples`` random windows of ``seqlen`` tokens from a token stream (the GPTQ / AWQ
protocol). The stream is a text tokenized with the model's own tokenizer, token ids the caller supplies, or
uniformly random ids (``random=True``; no tokenizer needed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from afpq_jax._src import validation
from afpq_jax._src.errors import InputError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """The calibration set and how calibration forwards batch it (frozen; `validate` checks it).

    Data (exactly one): ``text`` (tokenized with the model's tokenizer), ``token_ids`` (a 1-D token stream to draw
    windows from, or ready windows ``(samples, seqlen)``), or ``random=True``.
    ``seqlen`` is capped at the model's context. ``batch_size`` sequences go through each calibration forward;
    searches (AWQ's scale search, the clipping search) look at the first ``search_samples`` windows,
    ``search_batch_size`` at a time.
    """

    text: str | None = dataclasses.field(default=None, repr=False)
    token_ids: Any = dataclasses.field(default=None, repr=False)
    random: bool = False
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 2  # measured at L=512: 4 sequences cost +73 MiB of temporaries and were no faster
    search_samples: int = 16
    search_batch_size: int = 2

    def validate(self) -> None:
        sources = sum(x for x in (self.text is not None, self.token_ids is not None, bool(self.random)))
        if sources != 1:
            raise InputError("Calibration needs exactly one data source: text=..., token_ids=... or random=True")
        for f in ("samples", "seqlen", "batch_size", "search_samples", "search_batch_size"):
            validation.integer(getattr(self, f), f"calibration option {f}")
        validation.integer(self.seed, "calibration seed", minimum=0)
        if self.text is not None and not isinstance(self.text, str):
            raise InputError(f"Calibration.text must be a string, got {type(self.text).__name__}")
        if self.token_ids is not None:
            validation.token_ids(self.token_ids, "Calibration.token_ids")
        if self.seqlen < 2:
            raise InputError("calibration seqlen must be at least 2")
        if self.token_ids is not None and np.ndim(self.token_ids) not in (1, 2):
            raise InputError(f"Calibration.token_ids must be a 1-D token stream or 2-D windows, got shape "
                             f"{np.shape(self.token_ids)}")

    def options_json(self) -> dict[str, Any]:
        """The options without the data (recorded in quantization_config.json)."""
        data = "random" if self.random else ("text" if self.text is not None else "token_ids")
        return {"data": data, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                 if f.name not in ("text", "token_ids", "random")}}

    def windows(self, vocab_size: int, max_seq_len: int, tokenize=None, bos_token_id: int | None = None
                ) -> np.ndarray:
        """The calibration windows ``(samples, min(seqlen, max_seq_len))`` int32. ``tokenize(text) -> ids`` is
        needed for ``text``; windows drawn from a text or 1-D ids start with ``bos_token_id`` when it is given
        (`sample_windows`)."""
        self.validate()
        seqlen = min(self.seqlen, max_seq_len)
        if self.random:
            rng = np.random.default_rng(self.seed)
            return rng.integers(0, vocab_size, (self.samples, seqlen), dtype=np.int32)
        if self.text is not None:
            if tokenize is None:
                raise InputError("calibration text needs the model's tokenizer; pass token_ids instead")
            ids = tokenize(self.text)
        else:
            ids = np.asarray(self.token_ids)
            if ids.ndim == 2:
                if ids.shape[1] > max_seq_len:
                    raise InputError(f"calibration windows of {ids.shape[1]} tokens exceed the model's context "
                                     f"({max_seq_len})")
                ids = ids.astype(np.int32)
                _check_ids(ids, vocab_size)
                return ids
        ids = np.asarray(ids).astype(np.int32).reshape(-1)
        _check_ids(ids, vocab_size)
        return sample_windows(ids, self.samples, seqlen, self.seed, bos_token_id)


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InputError(f"calibration token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")


def sample_windows(token_ids, samples: int, seqlen: int, seed: int = 0, bos_token_id: int | None = None
                   ) -> np.ndarray:
    """``samples`` random windows of ``seqlen`` tokens (as GPTQ/AWQ draw their calibration set); with
    ``bos_token_id``, each is that token and ``seqlen - 1`` tokens of the text."""
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    take = seqlen - (bos_token_id is not None)
    if len(ids) <= take:
        raise InputError(f"calibration text has {len(ids)} tokens, not more than the sequence length {seqlen}; use "
                         f"a longer text or a shorter sequence length")
    starts = np.random.default_rng(seed).integers(0, len(ids) - take, samples)
    windows = np.stack([ids[s:s + take] for s in starts])
    if bos_token_id is not None:
        windows = np.concatenate([np.full((samples, 1), bos_token_id, np.int32), windows], axis=1)
    return windows
