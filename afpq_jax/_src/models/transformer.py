"""The decoder-only transformer every supported family instantiates (LLaMA, BLOOM, ...).

One implementation of attention (MHA/GQA, RoPE or ALiBi, optional KV cache), MLP (SwiGLU or GELU) and the
block; the family-specific parts are fields of `ModelConfig`. Every linear layer is a `QuantDense`, addressed
by a dotted path (``layers.3.attn.q_proj``) that quantization recipes and checkpoints use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src.layers import LayerNorm, QuantDense, RMSNorm
from afpq_jax._src.scheme import QuantScheme
from afpq_jax._src.models.config import ModelConfig

KVCache = list[tuple[jax.Array, jax.Array]]


def query_chunk(seq_len: int) -> int:
    """Queries per chunk of cache-free attention: 256, at most 8 chunks. Measured on 2 CPU cores, SmolLM2 at 2,048
    tokens: 7.3 s per forward (the whole window at once: 13.3 s; before this change, 14.5 s); 128-query chunks
    ran 8.8 s and took 15 s longer to compile."""
    return max(256, -(-seq_len // 8))


# ---- positions ---------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) with HF's default / linear / llama3 rules, in float32. ``local``: a
    sliding-window layer's, which is default RoPE at ``rope_local_theta`` when the config sets one (Gemma 3)."""
    d = cfg.head_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta is not None else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    if local and cfg.rope_local_theta is not None:
        return np.asarray(inv, np.float32)
    sc = cfg.rope_scaling_dict
    rtype = sc.get("rope_type", "default")
    if rtype == "linear":
        inv = inv / sc["factor"]
    elif rtype == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv = np.where(medium, smoothed, scaled)
    return np.asarray(inv, np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """HF's rotate-half RoPE. x: (B, S, H, D); positions: (B, S)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, S, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def alibi_slopes(num_heads: int) -> np.ndarray:
    """BLOOM/ALiBi per-head slopes (also for head counts that are not powers of two)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 2 * min(closest, num_heads - closest), 2)]
    return np.asarray(slopes, np.float32)


# ---- modules -----------------------------------------------------------------------------------------------

class Embedding(nnx.Module):
    """Token embeddings; ``scale``: multiplied by sqrt(dim) rounded to the weight dtype (Gemma: in bfloat16
    sqrt(3072) is 55.5, as transformers computes it)."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs, scale: bool = False):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype) * 0.02)
        self.scale = scale

    def __call__(self, ids: jax.Array) -> jax.Array:
        w = self.weight.get_value()
        x = jnp.take(w, ids, axis=0)
        if self.scale:
            x = x * jnp.asarray(np.float32(math.sqrt(w.shape[1]))).astype(w.dtype)
        return x


def _norm(cfg: ModelConfig, dtype, dim: int | None = None):
    """The family's norm over ``dim`` features (default: hidden_size; head_dim for q/k norms)."""
    if cfg.norm == "rms":
        return RMSNorm(dim or cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype, plus_one=cfg.norm_plus_one)
    return LayerNorm(dim or cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap · tanh(x / cap)`` (Gemma's logit soft-capping); ``x`` itself when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, quant: Mapping[str, QuantScheme], *, dtype, rngs,
                 window: int | None = None):
        """``window``: this layer's sliding window (keys a query sees, itself included), None = full causal."""
        self.cfg = cfg
        self.window = window
        h, kv, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

        def dense(name, n_in, n_out, bias):
            return QuantDense(n_in, n_out, use_bias=bias, dtype=dtype, scheme=quant.get(f"{prefix}.{name}"),
                              rngs=rngs)

        if cfg.fused_qkv:
            self.qkv_proj = dense("qkv_proj", e, 3 * h * d, cfg.attn_bias)
        else:
            self.q_proj = dense("q_proj", e, h * d, cfg.attn_bias)
            self.k_proj = dense("k_proj", e, kv * d, cfg.attn_bias)
            self.v_proj = dense("v_proj", e, kv * d, cfg.attn_bias)
        self.o_proj = dense("o_proj", h * d, e, cfg.attn_out_bias)
        self.q_norm = _norm(cfg, dtype, d) if cfg.qk_norm else None
        self.k_norm = _norm(cfg, dtype, d) if cfg.qk_norm else None

    def __call__(self, x, positions, cache: tuple[jax.Array, jax.Array] | None, start):
        cfg = self.cfg
        b, s, _ = x.shape
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.fused_qkv:  # BLOOM interleaves per head: (..., H, 3, D)
            qkv = self.qkv_proj(x).reshape(b, s, h, 3, d)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        else:
            q = self.q_proj(x).reshape(b, s, h, d)
            k = self.k_proj(x).reshape(b, s, kv, d)
            v = self.v_proj(x).reshape(b, s, kv, d)
        if self.q_norm is not None:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.position == "rope":
            inv_freq = rope_inv_freq(cfg, local=self.window is not None)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, start, 0, 0))
            cache = (k, v)
        qg = q.reshape(b, s, kv, h // kv, d)
        if cache is not None:  # positions index the cache: unfilled slots (key position > query's) are hidden
            out = self._attend(qg, k, v, positions)
        else:
            # Without a cache query i sees keys 0..i. Query chunks see only the keys up to their last query: the
            # masked upper triangle (up to 44% of the work) is skipped, and one chunk's scores stay
            # closer to cache-sized on CPU (see `query_chunk`). Plain unrolled chunks: differentiable, any backend.
            # A sliding-window layer's chunk starts at the first key its first query sees.
            c = query_chunk(s)
            outs = []
            for q0 in range(0, s, c):
                q1 = min(q0 + c, s)
                k0 = 0 if self.window is None else max(0, q0 - self.window + 1)
                outs.append(self._attend(qg[:, q0:q1], k[:, k0:q1], v[:, k0:q1], jnp.arange(q0, q1)[None], k0))
            out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
        return self.o_proj(out.reshape(b, s, h * d)), cache

    def _attend(self, qg, k, v, query_pos, key_start: int = 0):
        """softmax(q·k / √d [+ ALiBi], keys past the query's position or out of its window hidden) · v. qg: (B, S,
        KV, G, D); k, v: (B, T, KV, D), key t at position key_start + t; query_pos: (B or 1, S) -> (B, S, KV, G, D)
        in v's dtype. Scores, exponentials and the sums are float32; the weighted values are divided by the row
        sums after the product (one division per output element)."""
        d = qg.shape[-1]
        cfg = self.cfg
        key_pos = key_start + jnp.arange(k.shape[1])
        scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
        if cfg.query_pre_attn_scalar is None:
            scores = scores / math.sqrt(d)
        else:
            scores = scores * np.float32(cfg.query_pre_attn_scalar ** -0.5)
        if cfg.position == "alibi":
            slopes = jnp.asarray(alibi_slopes(cfg.num_heads)).reshape(qg.shape[2], qg.shape[3])
            scores = scores + slopes[None, :, :, None, None] * key_pos.astype(jnp.float32)
        allowed = key_pos[None, None, :] <= query_pos[:, :, None]  # (B or 1, S, T)
        if self.window is not None:
            allowed &= key_pos[None, None, :] > query_pos[:, :, None] - self.window
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        shift = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))  # its gradient cancels
        e = jnp.exp(scores - shift)
        out = jnp.einsum("bkgst,btkd->bskgd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
        total = jnp.sum(e, axis=-1).transpose(0, 3, 1, 2)[..., None]  # (B, S, KV, G, 1)
        return (out / total).astype(v.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, quant: Mapping[str, QuantScheme], *, dtype, rngs):
        self.cfg = cfg

        def dense(name, n_in, n_out):
            return QuantDense(n_in, n_out, use_bias=cfg.mlp_bias, dtype=dtype,
                              scheme=quant.get(f"{prefix}.{name}"), rngs=rngs)

        e, f = cfg.hidden_size, cfg.intermediate_size
        if cfg.gated_mlp:
            self.gate_proj = dense("gate_proj", e, f)
        self.up_proj = dense("up_proj", e, f)
        self.down_proj = dense("down_proj", f, e)
        self.act_scale = nnx.Param(jnp.ones((f,), dtype)) if cfg.mlp_act_scale else None

    def __call__(self, x):
        if self.cfg.mlp == "swiglu":
            h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.cfg.mlp == "geglu":
            h = jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x)
        else:
            h = jax.nn.gelu(self.up_proj(x), approximate=True)
        if self.act_scale is not None:
            h = h / self.act_scale.get_value().astype(h.dtype)
        return self.down_proj(h)


class Block(nnx.Module):
    """``x + attn(input_norm(x))``, then ``+ mlp(post_attn_norm(x))``: ``post_attn_norm`` is the norm before
    the MLP (HF LLaMA's post_attention_layernorm, Gemma's pre_feedforward_layernorm). With ``sandwich_norms``
    the attention and MLP outputs pass through ``attn_out_norm`` / ``mlp_out_norm`` before their residual adds
    (Gemma's post_attention_layernorm / post_feedforward_layernorm)."""

    def __init__(self, cfg: ModelConfig, index: int, quant: Mapping[str, QuantScheme], *, dtype, rngs):
        prefix = f"layers.{index}"
        self.input_norm = _norm(cfg, dtype)
        self.attn = Attention(cfg, f"{prefix}.attn", quant, dtype=dtype, rngs=rngs, window=cfg.window(index))
        self.attn_out_norm = _norm(cfg, dtype) if cfg.sandwich_norms else None
        self.post_attn_norm = _norm(cfg, dtype)
        self.mlp = MLP(cfg, f"{prefix}.mlp", quant, dtype=dtype, rngs=rngs)
        self.mlp_out_norm = _norm(cfg, dtype) if cfg.sandwich_norms else None

    def __call__(self, x, positions, cache=None, start=0):
        a, cache = self.attn(self.input_norm(x), positions, cache, start)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        x = x + a
        m = self.mlp(self.post_attn_norm(x))
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return x + m, cache


class CausalLM(nnx.Module):
    """Decoder-only LM. ``model(input_ids)`` with int32 ``[batch, seq]`` returns float32 logits
    ``[batch, seq, vocab]``; `forward_with_cache` does the same against a KV cache for generation.

    ``quant`` maps layer paths (see `linear_paths`) to the scheme their packed weights use; layers not in it hold
    float kernels.
    """

    def __init__(self, cfg: ModelConfig, *, quant: Mapping[str, QuantScheme] | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        quant = dict(quant or {})
        unknown = set(quant) - set(linear_paths(cfg))
        if unknown:
            raise InputError(f"quantization layout names unknown layers: {sorted(unknown)[:5]}")
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype).name
        self.checkpoint_info = None  # afpq_jax's CheckpointInfo: set by load / quantize_pretrained, used by save
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, scale=cfg.embed_scale)
        self.embed_norm = _norm(cfg, dtype) if cfg.embed_norm else None
        self.layers = nnx.List([Block(cfg, i, quant, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = _norm(cfg, dtype)
        self.lm_head = None if cfg.tie_embeddings else QuantDense(
            cfg.hidden_size, cfg.vocab_size, dtype=dtype, scheme=quant.get("lm_head"), rngs=rngs)

    def embed_inputs(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed(input_ids)
        return self.embed_norm(x) if self.embed_norm is not None else x

    def head(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = jnp.einsum("bse,ve->bsv", x, self.embed.weight.get_value(), preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        return softcap(logits.astype(jnp.float32), self.cfg.final_softcap)

    def __call__(self, input_ids: jax.Array, *, remat: bool = False) -> jax.Array:
        """``remat``: recompute each block's activations in the backward pass (training memory: one block's
        activations at a time instead of every block's)."""
        self.check_input_ids(input_ids)
        b, s = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x = self.embed_inputs(input_ids)
        for layer in self.layers:
            if remat:
                x = nnx.remat(_block_output)(layer, x, positions)
            else:
                x, _ = layer(x, positions)
        return self.head(x)

    def check_input_ids(self, input_ids) -> None:
        """Integer ``[batch, seq]`` ids, within the vocabulary when concrete (an out-of-range id would silently
        embed as NaN or wrap around). Longer sequences than the context are the caller's choice, as in HF
        transformers (`generate` and `perplexity` refuse them)."""
        if not hasattr(input_ids, "dtype"):  # a list: tracers and arrays keep their dtype
            input_ids = np.asarray(input_ids)
        shape, dtype = np.shape(input_ids), input_ids.dtype
        if len(shape) != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(shape)}; add a batch axis")
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ArgumentTypeError(f"input_ids must be integer token ids, got dtype {jnp.dtype(dtype).name}")
        if not isinstance(input_ids, jax.core.Tracer) and shape[0] * shape[1]:
            ids = np.asarray(input_ids)
            if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
                raise InputError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{ids.min()}, {ids.max()}]")

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(c.num_layers)]

    def forward_with_cache(self, input_ids: jax.Array, cache: KVCache, start: jax.Array | int
                           ) -> tuple[jax.Array, KVCache]:
        """Runs ``input_ids`` as positions ``start .. start+seq-1`` against (and into) ``cache``."""
        b, s = input_ids.shape
        positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
        x = self.embed_inputs(input_ids)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, positions, layer_cache, start)
            new_cache.append(layer_cache)
        return self.head(x), new_cache

    def linear_layers(self) -> dict[str, QuantDense]:
        """Every `QuantDense` by path (decoder blocks, then lm_head if untied)."""
        out = {f"layers.{i}.{name}": mod for i, layer in enumerate(self.layers)
               for name, mod in block_linears(layer).items()}
        if self.lm_head is not None:
            out["lm_head"] = self.lm_head
        return out

    def quantized_size(self) -> tuple[int, int]:
        """(weights, bytes) of the packed layers: codes, scales, zero points as stored."""
        q = [m for m in self.linear_layers().values() if m.is_quantized]
        return sum(m.in_features * m.out_features for m in q), sum(m.quantized_tensor().nbytes for m in q)


def _block_output(block: Block, x: jax.Array, positions: jax.Array) -> jax.Array:
    return block(x, positions)[0]


# Layers that read the same input and that serving stacks run as one fused matmul (vLLM's qkv_proj, gate_up_proj),
# block-relative: a fused NVFP4 layer has one global scale, so its members are quantized under one.
FUSED_SIBLINGS = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))

_LINEAR_NAMES = ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_linears(block: Block) -> dict[str, QuantDense]:
    """A block's `QuantDense` layers by path relative to the block (``attn.q_proj``), in forward order."""
    out = {}
    for group_name, group in (("attn", block.attn), ("mlp", block.mlp)):
        for name in _LINEAR_NAMES:
            mod = getattr(group, name, None)
            if isinstance(mod, QuantDense):
                out[f"{group_name}.{name}"] = mod
    return out


def linear_paths(cfg: ModelConfig) -> list[str]:
    """Paths of all linear layers of an architecture, in forward order."""
    attn = ["qkv_proj"] if cfg.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    mlp = (["gate_proj"] if cfg.gated_mlp else []) + ["up_proj", "down_proj"]
    paths = []
    for i in range(cfg.num_layers):
        paths += [f"layers.{i}.attn.{n}" for n in attn + ["o_proj"]]
        paths += [f"layers.{i}.mlp.{n}" for n in mlp]
    return paths + ([] if cfg.tie_embeddings else ["lm_head"])
