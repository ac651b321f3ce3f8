"""Perplexity (non-overlapping windows, the GPTQ/AFPQ-paper protocol); generation lives in `generation`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from afpq_jax._src.errors import InputError
from afpq_jax._src.models import CausalLM


def default_seq_len(model: CausalLM) -> int:
    return min(2048, model.cfg.max_seq_len)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll_sum(graphdef, state, ids):
    logits = nnx.merge(graphdef, state)(ids)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _nll_fn(model: CausalLM):
    # graphdef is static (hashable): models of one architecture share one compiled function.
    graphdef, state = nnx.split(model)
    return lambda ids: _window_nll_sum(graphdef, state, ids)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def perplexity(model: CausalLM, token_ids, *, seq_len: int | None = None, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True) -> dict:
    """exp(mean NLL) over ``len(ids) // seq_len`` non-overlapping windows (the remainder is dropped); each
    window predicts its tokens 1..L-1 from the preceding ones, as in GPTQ's and AFPQ's WikiText-2 protocol."""
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    seq_len = default_seq_len(model) if seq_len is None else seq_len  # 0 is an error, not "the default"
    if not _is_int(seq_len) or seq_len < 2:
        raise InputError(f"seq_len must be an integer of at least 2 (or None: the default), got {seq_len!r}")
    if seq_len > model.cfg.max_seq_len:  # beyond the positions the model was trained for (and memory runs out)
        raise InputError(f"seq_len {seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens "
                         f"(max_position_embeddings); use a seq_len of at most {model.cfg.max_seq_len}")
    if not _is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_windows is not None and (not _is_int(max_windows) or max_windows < 1):
        raise InputError(f"max_windows must be a positive integer or None (all windows), got {max_windows!r}")
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}; use a longer text or "
                         f"a smaller --seq-len")
    windows = ids[: n * seq_len].reshape(n, seq_len)
    fn = _nll_fn(model)
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
        total += float(fn(jnp.asarray(windows[i:i + batch_size])))
    count = n * (seq_len - 1)
    return {"perplexity": math.exp(total / count), "nll": total / count, "windows": n, "seq_len": seq_len,
            "tokens": count}
