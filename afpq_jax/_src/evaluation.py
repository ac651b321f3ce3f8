"""Perplexity (non-overlapping windows, the GPTQ/AFPQ-paper protocol); generation lives in `generation`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from afpq_jax._src import validation
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


def perplexity(model: CausalLM, token_ids, *, seq_len: int | None = None, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True, bos_token_id: int | None = None) -> dict:
    """exp(mean NLL) over ``len(ids) // seq_len`` non-overlapping windows (the remainder is dropped); each
    window predicts its tokens 1..L-1 from the preceding ones, as in GPTQ's and AFPQ's WikiText-2 protocol.

    ``bos_token_id`` (for models whose tokenizer starts every text with it: `afpq_jax.eval.bos_prefix`): each
    window is that token and ``seq_len - 1`` tokens of the text, all of them predicted (``len(ids) //
    (seq_len - 1)`` windows)."""
    ids = np.asarray(token_ids).reshape(-1)
    if ids.size:  # float ids would be truncated (an empty list is float64: "fewer than one window" below)
        ids = validation.token_ids(ids, "token_ids")
    seq_len = default_seq_len(model) if seq_len is None else seq_len  # 0 is an error, not "the default"
    validation.integer(seq_len, "seq_len", minimum=2)
    if seq_len > model.cfg.max_seq_len:  # beyond the positions the model was trained for (and memory runs out)
        raise InputError(f"seq_len {seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens "
                         f"(max_position_embeddings); use a seq_len of at most {model.cfg.max_seq_len}")
    validation.integer(batch_size, "batch_size")
    if max_windows is not None:
        validation.integer(max_windows, "max_windows")
    take = seq_len - (bos_token_id is not None)
    n = len(ids) // take
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}; use a longer text or "
                         f"a smaller --seq-len")
    windows = ids[: n * take].reshape(n, take)
    if bos_token_id is not None:
        windows = np.concatenate([np.full((n, 1), bos_token_id, windows.dtype), windows], axis=1)
    model.check_input_ids(windows)  # as the forward pass does: an id past the vocabulary gave NaN
    windows = windows.astype(np.int32)  # after the check: int32 would wrap an id of 2**32 to 0
    fn = _nll_fn(model)
    total = 0.0
    for i in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress, leave=False):
        total += float(fn(jnp.asarray(windows[i:i + batch_size])))
    count = n * (seq_len - 1)
    return {"perplexity": math.exp(total / count), "nll": total / count, "windows": n, "seq_len": seq_len,
            "tokens": count}
