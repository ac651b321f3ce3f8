"""LLaMA family (LLaMA 1/2/3, SmolLM2, TinyLlama, Mistral: a sliding window on every layer): HF config ->
ModelConfig, and key table."""

from __future__ import annotations

from afpq_jax._src.errors import CheckpointError, InputError
from afpq_jax._src.models.config import ModelConfig, check_rope_scaling, hf_field
from afpq_jax._src.models.params import KeyRule, rope_settings

MODEL_TYPES = ("llama", "mistral")

LAYER = r"model\.layers\.(\d+)\."  # a decoder block's key prefix (group 0: its index)
KEY_RULES = (
    KeyRule(r"model\.embed_tokens\.weight", "embed.weight"),
    KeyRule(LAYER + r"self_attn\.([qkvo])_proj\.weight", "layers.{0}.attn.{1}_proj.kernel", transpose=True),
    KeyRule(LAYER + r"self_attn\.([qkvo])_proj\.bias", "layers.{0}.attn.{1}_proj.bias"),
    KeyRule(LAYER + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel", transpose=True),
    KeyRule(LAYER + r"mlp\.(gate|up|down)_proj\.bias", "layers.{0}.mlp.{1}_proj.bias"),
    KeyRule(LAYER + r"input_layernorm\.weight", "layers.{0}.input_norm.weight"),
    KeyRule(LAYER + r"post_attention_layernorm\.weight", "layers.{0}.post_attn_norm.weight"),
    KeyRule(r"model\.norm\.weight", "final_norm.weight"),
    KeyRule(r"lm_head\.weight", "lm_head.kernel", transpose=True, unless_tied=True),
    KeyRule(r".*rotary_emb\.inv_freq", None),
)


def config_from_hf(hf: dict) -> ModelConfig:
    """`ModelConfig` of a LLaMA-family config.json; every field it reads is checked first (`hf_field`)."""
    act = hf_field(hf, "hidden_act", "str", "silu")
    if act != "silu":
        raise InputError(f"LLaMA-family model with hidden_act={act!r}; only 'silu' is supported")
    hidden = hf_field(hf, "hidden_size", "int")
    heads = hf_field(hf, "num_attention_heads", "int")
    head_dim = hf_field(hf, "head_dim", "int", None)
    if head_dim is None:
        if hidden % heads:  # HF would build heads * (hidden // heads)-wide projections: not this checkpoint's
            raise CheckpointError(f"config.json: hidden_size ({hidden}) must be divisible by num_attention_heads "
                                  f"({heads}) when head_dim is not given; fix config.json or add head_dim")
        head_dim = hidden // heads
    theta, scaling = _rope(hf)
    max_pos = hf_field(hf, "max_position_embeddings", "int", 2048)
    window = hf_field(hf, "sliding_window", "int", None) if hf.get("model_type") == "mistral" else None
    layers = hf_field(hf, "num_hidden_layers", "int")
    bias = hf_field(hf, "attention_bias", "bool", False)
    return ModelConfig(
        model_type=hf.get("model_type", "llama"), vocab_size=hf_field(hf, "vocab_size", "int"), hidden_size=hidden,
        intermediate_size=hf_field(hf, "intermediate_size", "int"),
        num_layers=layers, num_heads=heads,
        num_kv_heads=hf_field(hf, "num_key_value_heads", "int", heads), head_dim=head_dim,
        norm="rms", norm_eps=hf_field(hf, "rms_norm_eps", "positive", 1e-6), position="rope", mlp="swiglu",
        attn_bias=bias, attn_out_bias=bias, mlp_bias=hf_field(hf, "mlp_bias", "bool", False),
        tie_embeddings=hf_field(hf, "tie_word_embeddings", "bool", False),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos,
        bos_token_id=hf_field(hf, "bos_token_id", "token_id", None),
        eos_token_id=hf_field(hf, "eos_token_id", "token_ids", None),
        sliding_window=window, layer_types=None if window is None else ("sliding_attention",) * layers)


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """`rope_settings` of a config whose rope keys (transformers 4's rope_theta / rope_scaling or 5's
    rope_parameters) were checked first: it reads them without checks (float("abc"), dict("linear") raised)."""
    params = hf_field(hf, "rope_parameters", "object", {})
    hf_field(params, "rope_theta", "positive", None, where="rope_parameters.")
    hf_field(hf, "rope_theta", "positive", None)
    hf_field(hf, "rope_scaling", "object", None)
    theta, scaling = rope_settings(hf)
    if scaling is not None:
        key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"  # where rope_settings read it
        check_rope_scaling(dict(scaling), f"config.json: {key}", CheckpointError)
    return theta, scaling
