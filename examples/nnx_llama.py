"""A LLaMA decoder written the way JAX model zoos write one (bonsai style): Flax NNX, ``nnx.Einsum`` attention
projections with separate head axes, ``nnx.Linear`` MLP, a params mapping from a Hugging Face safetensors file.

It knows nothing of afpq-jax: it is the "model you did not write" that `afpq_jax.qwix` quantizes (see README,
"Quantizing your own Flax model", and tests/interop/test_qwix.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    layers: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        return cls(vocab_size=config["vocab_size"], hidden=config["hidden_size"],
                   heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"],
                   head_dim=config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]),
                   intermediate=config["intermediate_size"], layers=config["num_hidden_layers"],
                   rope_theta=config.get("rope_theta", 10000.0), norm_eps=config.get("rms_norm_eps", 1e-6),
                   tie_embeddings=config.get("tie_word_embeddings", False))


def rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotate-half rotary embedding (Hugging Face's layout) of x (B, T, N, H)."""
    t, h = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float32) / h)
    ang = np.arange(t, dtype=np.float32)[:, None] * inv[None, :]
    cos, sin = jnp.asarray(np.cos(ang))[None, :, None, :], jnp.asarray(np.sin(ang))[None, :, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nnx.Einsum("BTD,DNH->BTNH", (d, n, h), rngs=rngs)
        self.k_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), rngs=rngs)
        self.v_proj = nnx.Einsum("BTD,DKH->BTKH", (d, k, h), rngs=rngs)
        self.o_proj = nnx.Einsum("BTNH,NHD->BTD", (n, h, d), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        q = rope(self.q_proj(x), cfg.rope_theta)
        k = rope(self.k_proj(x), cfg.rope_theta)
        v = self.v_proj(x)
        rep = cfg.heads // cfg.kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(cfg.head_dim)
        t = x.shape[1]
        s = jnp.where(np.tril(np.ones((t, t), bool)), s, -1e30)
        return self.o_proj(jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v))


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = nnx.Linear(cfg.hidden, cfg.intermediate, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(cfg.hidden, cfg.intermediate, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(cfg.intermediate, cfg.hidden, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = nnx.RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedder = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.final_norm = nnx.RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(cfg.hidden, cfg.vocab_size, use_bias=False,
                                                                  rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embedder(tokens)
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        return self.embedder.attend(x) if self.lm_head is None else self.lm_head(x)


def hf_params(directory: str | Path, cfg: LlamaConfig) -> dict:
    """The pure params dict of `Llama` from a Hugging Face LLaMA directory (model.safetensors), float32."""
    from safetensors import safe_open
    d, n, k, h = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    f = safe_open(str(Path(directory) / "model.safetensors"), framework="numpy")

    def f32(name):  # one tensor at a time, as the mapping asks for it
        return np.asarray(f.get_tensor(name), np.float32)

    layers = {}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        layers[i] = {
            "input_layernorm": {"scale": f32(p + "input_layernorm.weight")},
            "post_attention_layernorm": {"scale": f32(p + "post_attention_layernorm.weight")},
            "attn": {"q_proj": {"kernel": f32(p + "self_attn.q_proj.weight").T.reshape(d, n, h)},
                     "k_proj": {"kernel": f32(p + "self_attn.k_proj.weight").T.reshape(d, k, h)},
                     "v_proj": {"kernel": f32(p + "self_attn.v_proj.weight").T.reshape(d, k, h)},
                     "o_proj": {"kernel": f32(p + "self_attn.o_proj.weight").T.reshape(n, h, d)}},
            "mlp": {name: {"kernel": f32(p + f"mlp.{name}.weight").T} for name in ("gate_proj", "up_proj",
                                                                                 "down_proj")}}
    params = {"embedder": {"embedding": f32("model.embed_tokens.weight")}, "layers": layers,
              "final_norm": {"scale": f32("model.norm.weight")}}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": f32("lm_head.weight").T}
    return params


def load_hf(directory: str | Path) -> Llama:
    """`Llama` with the weights of a Hugging Face LLaMA directory."""
    cfg = LlamaConfig.from_hf(json.loads((Path(directory) / "config.json").read_text()))
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, hf_params(directory, cfg))
    return model
