"""QAT training data: sequences the teacher writes itself (BitDistiller's self-generated data), cached on disk,
and the deterministic batch order that makes a resumed run see exactly the batches it would have seen.

Prompts are ``prompt_len``-token windows drawn (seeded) from the calibration text's token ids, or the lines of a
user's prompt file; the teacher continues each with ``new_tokens`` sampled tokens (temperature 0.7 by default) via
`afpq_jax.generate`. The (prompt + continuation) id matrix is written to ``cache_dir`` as ``.npy`` (temporary
file, then rename) under a name that hashes everything it depends on, so a second run (or a resumed one) reuses
it instead of generating again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from afpq_jax._src import validation
from afpq_jax._src.calibration.data import sample_windows
from afpq_jax._src.errors import InputError
from afpq_jax._src.io import outputs
from afpq_jax._src.io.files import read_text
from afpq_jax._src.generation import generate
from afpq_jax._src.models import CausalLM


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfGeneratedData:
    """How the teacher writes the QAT training set: ``samples`` prompts of ``prompt_len`` tokens (windows of the
    calibration data, or the first ``prompt_len`` tokens of each line of ``prompt_file`` that has that many),
    each continued by ``new_tokens`` tokens sampled at ``temperature`` (BitDistiller: 0.7), ``batch_size``
    sequences per generation call; cached under ``cache_dir`` (default: afpq-jax's cache directory)."""

    samples: int = 64
    prompt_len: int = 16
    new_tokens: int = 256
    temperature: float = 0.7
    batch_size: int = 8
    seed: int = 0
    prompt_file: str | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        for name in ("samples", "prompt_len", "new_tokens", "batch_size"):
            validation.integer(getattr(self, name), f"self-generated data: {name}")
        validation.integer(self.seed, "self-generated data: seed", minimum=0)
        if not validation.number(self.temperature, "self-generated data: temperature") >= 0:
            raise InputError(f"self-generated data: temperature must be >= 0, got {self.temperature}")

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "cache_dir"}


def read_prompt_file(path: str | os.PathLike, tokenizer) -> list[np.ndarray]:
    """Token ids of each non-empty line of a UTF-8 prompt file."""
    p = Path(path)
    lines = [line.strip() for line in read_text(p, "prompt file").splitlines()]
    prompts = [np.asarray(tokenizer(line, add_special_tokens=False)["input_ids"], np.int32) for line in lines if line]
    prompts = [ids for ids in prompts if len(ids)]
    if not prompts:
        raise InputError(f"prompt file {p} holds no prompts (one per line)")
    return prompts


def self_generated(teacher: CausalLM, prompts: np.ndarray | list[np.ndarray], *, new_tokens: int,
                   temperature: float = 0.7, batch_size: int = 8, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None, fingerprint: str = "", progress: bool = True
                   ) -> np.ndarray:
    """The teacher's continuations of ``prompts`` as ``(n, prompt_len + new_tokens)`` int32 sequences.

    ``prompts``: an (n, prompt_len) id matrix, or a list of id arrays (grouped by length into batches; the rows
    come back in the given order, right-padded with each group's own continuation length, so lengths match only
    when all prompts have one length). ``fingerprint`` names the teacher in the cache key (e.g. its source path
    and config); without ``cache_dir`` nothing is cached.
    """
    if isinstance(prompts, np.ndarray):
        prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts to generate training data from")
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise InputError(f"self-generated training data needs prompts of one length (got {sorted(lengths)[:4]}); "
                         f"use prompt windows from the text, or prompts of equal token length")
    key_src = json.dumps({"teacher": fingerprint, "prompts": hashlib.sha256(np.stack(prompts).tobytes()).hexdigest(),
                          "new_tokens": new_tokens, "temperature": temperature, "seed": seed,
                          "batch_size": batch_size})
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"selfgen-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.npy"
        if cache.is_file():
            return np.load(cache)
    matrix = np.stack(prompts).astype(np.int32)
    out = []
    key = jax.random.key(seed)
    for i in tqdm(range(0, len(matrix), batch_size), desc="self-generating", unit="batch", disable=not progress):
        batch = matrix[i:i + batch_size]
        new = generate(teacher, batch, max_new_tokens=new_tokens, temperature=temperature,
                       key=jax.random.fold_in(key, i))
        out.append(np.concatenate([batch, new], axis=1))
    data = np.concatenate(out).astype(np.int32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save(path) would append ".npy" to the name
                np.save(f, data)

        outputs.atomic_write(cache, write, size=data.nbytes)
    return data


def prompt_windows(token_ids: np.ndarray, n: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded random windows of ``prompt_len`` tokens from a token stream (the calibration text)."""
    return sample_windows(token_ids, n, prompt_len, seed)


def batch_indices(n: int, position: int, count: int, seed: int) -> np.ndarray:
    """Sample indices ``position .. position + count - 1`` of the endless stream that visits all ``n`` sequences in
    a fresh seeded permutation per epoch: the same (position, count) always gives the same indices."""
    out = []
    for p in range(position, position + count):
        epoch, i = divmod(p, n)
        out.append(np.random.default_rng([seed, epoch]).permutation(n)[i])
    return np.asarray(out, np.int64)


def batches(data: np.ndarray, *, position: int, batch_size: int, accum: int, seed: int
            ) -> Iterator[tuple[int, np.ndarray]]:
    """Endless (next position, ids (accum, batch_size, L)) from ``position`` on."""
    while True:
        count = batch_size * accum
        idx = batch_indices(len(data), position, count, seed)
        position += count
        yield position, data[idx].reshape(accum, batch_size, data.shape[1])
