"""Perplexity (non-overlapping windows, the GPTQ/AFPQ-paper protocol) and greedy generation with a KV cache."""

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


def perplexity(model: CausalLM, token_ids, *, seq_len: int | None = None, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True) -> dict:
    """exp(mean NLL) over ``len(ids) // seq_len`` non-overlapping windows (the remainder is dropped); each
    window predicts its tokens 1..L-1 from the preceding ones, as in GPTQ's and AFPQ's WikiText-2 protocol."""
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    seq_len = seq_len or default_seq_len(model)
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}")
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


def generate(model: CausalLM, prompt_ids, *, max_new_tokens: int = 32, eos_token_id=None) -> np.ndarray:
    """Greedy decoding with a KV cache: prefill the prompt once, then one token per step. Returns the new ids
    ``[batch, <= max_new_tokens]`` (stops early when every sequence produced ``eos_token_id``)."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    b, s = prompt.shape
    max_len = s + max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise InputError(f"prompt ({s}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"({model.cfg.max_seq_len})")
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, cache, start):
        logits, cache = nnx.merge(graphdef, state).forward_with_cache(ids, cache, start)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    cache = model.init_cache(b, max_len)
    token, cache = step(state, jnp.asarray(prompt), cache, jnp.int32(0))
    eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
    out = [np.asarray(token)]
    done = np.isin(out[-1], list(eos))
    for i in range(1, max_new_tokens):
        if done.all():
            break
        token, cache = step(state, token[:, None], cache, jnp.int32(s + i - 1))
        out.append(np.asarray(token))
        done |= np.isin(out[-1], list(eos))
    return np.stack(out, axis=1)
