"""Text generation: batched sampling (temperature / top-k / top-p) or greedy decoding with a KV cache.

The whole decode (prefill, then one token per step in a `lax.while_loop` that stops when every sequence has
produced an end token) is one jitted program, compiled once per (architecture, batch, prompt length,
max_new_tokens, greedy or not, top-k, top-p on or off; temperature and p are ordinary arguments) and reused across calls and models of the same architecture: the model's
graphdef is a static argument, its state an ordinary one.

Sampling: logits / temperature, then top-k (keep the k largest), then top-p (keep the smallest set of most
likely tokens whose probability reaches p; the most likely token always stays), then a categorical draw with
the key ``fold_in(key, step)``: a fixed key reproduces the same tokens. ``temperature=0`` is greedy (argmax).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
from flax import nnx

from afpq_jax._src.errors import InputError
from afpq_jax._src.models import CausalLM


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float | jax.Array, top_k: int | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
    """One token id per row of ``logits`` (..., V) as int32 (see the module doc for the rule). ``temperature``
    and ``top_p`` may be traced; a Python 0 temperature is greedy."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = before < top_p  # the first token always (before = 0)
        cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_new_tokens", "greedy", "top_k", "use_top_p", "eos"))
def _decode(graphdef, state, prompt, key, temperature, top_p, *, max_new_tokens: int, greedy: bool, top_k,
            use_top_p: bool, eos):
    model = nnx.merge(graphdef, state)
    b, s = prompt.shape
    cache = model.init_cache(b, s + max_new_tokens)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def pick(logits, step):
        return sample_logits(logits[:, -1], jax.random.fold_in(key, step), temperature=0 if greedy else temperature,
                             top_k=top_k, top_p=top_p if use_top_p else None)

    logits, cache = model.forward_with_cache(prompt, cache, 0)
    token = pick(logits, 0)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos_ids)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, out, done = carry
        logits, cache = model.forward_with_cache(token[:, None], cache, s + i - 1)
        token = pick(logits, i)
        return i + 1, token, cache, out.at[:, i].set(token), done | jnp.isin(token, eos_ids)

    steps, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, done))
    return out, steps


def generate(model: CausalLM, prompt_ids: ArrayLike, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, key: jax.Array | int | None = None,
             eos_token_id: int | list[int] | None = None) -> np.ndarray:
    """Continuations of ``prompt_ids`` (int ``[batch, seq]`` or ``[seq]``, equal-length prompts) as new token ids
    ``[batch, n]``: greedy with ``temperature=0`` (default), else sampled (``top_k`` / ``top_p`` optional; ``key``
    a PRNG key or an int seed, default 0). Stops after ``max_new_tokens`` or once every sequence has produced an
    ``eos_token_id`` (n is then the step at which the last one did; a finished sequence's later tokens are
    whatever was sampled and should be cut at its first end token)."""
    try:
        prompt = np.asarray(prompt_ids)
    except ValueError:  # ragged nested lists
        prompt = np.asarray([], dtype=object)
    if prompt.dtype == object or not np.issubdtype(prompt.dtype, np.integer):
        raise InputError("prompt_ids must be integer token ids of equal length per batch ([batch, seq] or [seq])")
    prompt = prompt.astype(np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise InputError(f"prompt_ids must be [batch, seq] with seq >= 1, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if prompt.min() < 0 or prompt.max() >= model.cfg.vocab_size:
        raise InputError(f"prompt token ids must lie in [0, {model.cfg.vocab_size}), got [{prompt.min()}, "
                         f"{prompt.max()}]")
    b, s = prompt.shape
    if s + max_new_tokens > model.cfg.max_seq_len:
        raise InputError(f"prompt ({s}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"({model.cfg.max_seq_len})")
    if key is None or isinstance(key, (int, np.integer)):
        key = jax.random.key(0 if key is None else int(key))
    eos = () if eos_token_id is None else tuple(int(t) for t in np.atleast_1d(eos_token_id))
    graphdef, state = nnx.split(model)
    use_top_p = top_p is not None and top_p < 1
    out, steps = _decode(graphdef, state, jnp.asarray(prompt), key, jnp.float32(temperature or 1.0),
                         jnp.float32(top_p if use_top_p else 1.0), max_new_tokens=int(max_new_tokens),
                         greedy=temperature == 0, top_k=None if top_k is None else int(top_k), use_top_p=use_top_p,
                         eos=eos)
    return np.asarray(out)[:, : int(steps)]
