"""BLOOM family: HF config -> ModelConfig, and key table (with or without the ``transformer.`` prefix)."""

from __future__ import annotations

from afpq_jax._src.errors import InputError
from afpq_jax._src.models.config import ModelConfig
from afpq_jax._src.models.params import KeyRule

MODEL_TYPES = ("bloom",)

_P = r"(?:transformer\.)?"
_H = _P + r"h\.(\d+)\."
KEY_RULES = (
    KeyRule(_P + r"word_embeddings\.weight", "embed.weight"),
    KeyRule(_P + r"word_embeddings_layernorm\.(weight|bias)", "embed_norm.{0}"),
    KeyRule(_H + r"input_layernorm\.(weight|bias)", "layers.{0}.input_norm.{1}"),
    KeyRule(_H + r"self_attention\.query_key_value\.weight", "layers.{0}.attn.qkv_proj.kernel", transpose=True),
    KeyRule(_H + r"self_attention\.query_key_value\.bias", "layers.{0}.attn.qkv_proj.bias"),
    KeyRule(_H + r"self_attention\.dense\.weight", "layers.{0}.attn.o_proj.kernel", transpose=True),
    KeyRule(_H + r"self_attention\.dense\.bias", "layers.{0}.attn.o_proj.bias"),
    KeyRule(_H + r"post_attention_layernorm\.(weight|bias)", "layers.{0}.post_attn_norm.{1}"),
    KeyRule(_H + r"mlp\.dense_h_to_4h\.weight", "layers.{0}.mlp.up_proj.kernel", transpose=True),
    KeyRule(_H + r"mlp\.dense_h_to_4h\.bias", "layers.{0}.mlp.up_proj.bias"),
    KeyRule(_H + r"mlp\.dense_4h_to_h\.weight", "layers.{0}.mlp.down_proj.kernel", transpose=True),
    KeyRule(_H + r"mlp\.dense_4h_to_h\.bias", "layers.{0}.mlp.down_proj.bias"),
    KeyRule(_P + r"ln_f\.(weight|bias)", "final_norm.{0}"),
    KeyRule(r"lm_head\.weight", "lm_head.kernel", transpose=True, unless_tied=True),
)


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm", False):
        raise InputError("BLOOM with apply_residual_connection_post_layernorm=true is not supported")
    hidden = hf.get("hidden_size") or hf["n_embed"]
    heads = hf["n_head"]
    return ModelConfig(
        model_type="bloom", vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=4 * hidden,
        num_layers=hf["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="alibi", mlp="gelu", fused_qkv=True,
        attn_bias=True, attn_out_bias=True, mlp_bias=True, embed_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_position_embeddings=hf.get("seq_length") or hf.get("max_position_embeddings") or 2048,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
