"""LLaMA family (LLaMA 1/2/3, SmolLM2, TinyLlama, Mistral-style): HF config -> ModelConfig, and key table."""

from __future__ import annotations

from afpq_jax._src.errors import InputError
from afpq_jax._src.models.config import ModelConfig
from afpq_jax._src.models.params import KeyRule, rope_settings

MODEL_TYPES = ("llama", "mistral")

_L = r"model\.layers\.(\d+)\."
KEY_RULES = (
    KeyRule(r"model\.embed_tokens\.weight", "embed.weight"),
    KeyRule(_L + r"self_attn\.([qkvo])_proj\.weight", "layers.{0}.attn.{1}_proj.kernel", transpose=True),
    KeyRule(_L + r"self_attn\.([qkvo])_proj\.bias", "layers.{0}.attn.{1}_proj.bias"),
    KeyRule(_L + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel", transpose=True),
    KeyRule(_L + r"mlp\.(gate|up|down)_proj\.bias", "layers.{0}.mlp.{1}_proj.bias"),
    KeyRule(_L + r"input_layernorm\.weight", "layers.{0}.input_norm.weight"),
    KeyRule(_L + r"post_attention_layernorm\.weight", "layers.{0}.post_attn_norm.weight"),
    KeyRule(r"model\.norm\.weight", "final_norm.weight"),
    KeyRule(r"lm_head\.weight", "lm_head.kernel", transpose=True, unless_tied=True),
    KeyRule(r".*rotary_emb\.inv_freq", None),
)


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise InputError(f"LLaMA-family model with hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    heads = hf["num_attention_heads"]
    theta, scaling = rope_settings(hf)
    max_pos = hf.get("max_position_embeddings", 2048)
    if hf.get("model_type") == "mistral" and hf.get("sliding_window"):
        # Sliding-window attention equals full attention up to the window: cap the usable context there.
        max_pos = min(max_pos, hf["sliding_window"])
    return ModelConfig(
        model_type=hf.get("model_type", "llama"), vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope", mlp="swiglu",
        attn_bias=bool(hf.get("attention_bias", False)), attn_out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_hashable(hf.get("eos_token_id")))


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v
