"""Qwen 2 / 2.5 and Qwen 3: LLaMA's layout with Qwen2's q/k/v biases (o_proj without), Qwen3's per-head q/k
RMSNorm and explicit head_dim, and the optional sliding window on the layers from ``max_window_layers`` on."""

from __future__ import annotations

import dataclasses

from afpq_jax._src.models import llama
from afpq_jax._src.models.config import ModelConfig, hf_field, hf_layer_types
from afpq_jax._src.models.params import KeyRule

MODEL_TYPES = ("qwen2", "qwen3")

KEY_RULES = (
    *llama.KEY_RULES,
    KeyRule(llama.LAYER + r"self_attn\.([qk])_norm\.weight", "layers.{0}.attn.{1}_norm.weight"),
)


def config_from_hf(hf: dict) -> ModelConfig:
    """`ModelConfig` of a Qwen2 / Qwen3 config.json (every field checked first, as `llama.config_from_hf`)."""
    qwen3 = hf.get("model_type") == "qwen3"
    if qwen3:  # Qwen3Config's head_dim default is 128, not hidden / heads
        hf = {**hf, "head_dim": hf_field(hf, "head_dim", "int", 128)}
    cfg = llama.config_from_hf(hf)
    layers = cfg.num_layers
    window, types = None, None
    if hf_field(hf, "use_sliding_window", "bool", False):
        window = hf_field(hf, "sliding_window", "int", 4096)  # Qwen2Config's / Qwen3Config's defaults
        first = hf_field(hf, "max_window_layers", "int", 28)
        types = hf_layer_types(hf, layers) or tuple(
            "sliding_attention" if i >= first else "full_attention" for i in range(layers))
        if "sliding_attention" not in types:
            window, types = None, None
    bias = hf_field(hf, "attention_bias", "bool", False)
    return dataclasses.replace(
        cfg, attn_bias=bias if qwen3 else True, attn_out_bias=bias if qwen3 else False, qk_norm=qwen3,
        sliding_window=window, layer_types=types)
