"""BLOOM family: HF config -> ModelConfig, and key table (with or without the ``transformer.`` prefix)."""

from __future__ import annotations

from afpq_jax._src.errors import CheckpointError, InputError
from afpq_jax._src.models.config import ModelConfig, hf_field
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
    """`ModelConfig` of a BLOOM config.json; every field it reads is checked first (`hf_field`)."""
    if hf_field(hf, "apply_residual_connection_post_layernorm", "bool", False):
        raise InputError("BLOOM with apply_residual_connection_post_layernorm=true is not supported")
    # BloomConfig's aliases: hub configs spell them either way
    hidden = hf_field(hf, ("hidden_size", "n_embed"), "int")
    heads = hf_field(hf, ("n_head", "num_attention_heads"), "int")
    if hidden % heads:
        raise CheckpointError(f"config.json: hidden_size ({hidden}) must be divisible by n_head ({heads}); "
                              f"fix config.json")
    layers = hf_field(hf, ("n_layer", "num_hidden_layers"), "int")
    max_pos = hf_field(hf, ("seq_length", "max_position_embeddings"), "int", 2048)
    return ModelConfig(
        model_type="bloom", vocab_size=hf_field(hf, "vocab_size", "int"), hidden_size=hidden,
        intermediate_size=4 * hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, norm="layer",
        norm_eps=hf_field(hf, "layer_norm_epsilon", "positive", 1e-5), position="alibi", mlp="gelu",
        fused_qkv=True, attn_bias=True, attn_out_bias=True, mlp_bias=True, embed_norm=True,
        tie_embeddings=hf_field(hf, "tie_word_embeddings", "bool", True), max_position_embeddings=max_pos,
        bos_token_id=hf_field(hf, "bos_token_id", "token_id", None),
        eos_token_id=hf_field(hf, "eos_token_id", "token_ids", None))
