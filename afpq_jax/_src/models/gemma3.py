"""Gemma 3 (text): ``gemma3_text`` checkpoints (Gemma3ForCausalLM) and the text tower of ``gemma3`` ones
(Gemma3ForConditionalGeneration: its vision tower and projector are not read).

Gemma 3 on `ModelConfig`: (1 + w) RMSNorms in float32, four per block (HF's post_attention_layernorm is our
``attn_out_norm``, pre_feedforward_layernorm our ``post_attn_norm``: the norm before the MLP, as in LLaMA),
q/k RMSNorm over head_dim, GeGLU, embeddings × sqrt(hidden), scores × query_pre_attn_scalar^-1/2, sliding-window
layers (five of six by default) with their own RoPE base, tied embeddings. Absent config keys take
``Gemma3TextConfig``'s defaults, as transformers does: hub configs of the larger models omit many of them.
"""

from __future__ import annotations

from typing import Any

from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.models.config import ModelConfig, check_rope_scaling, hf_field, hf_layer_types
from afpq_jax._src.models.params import KeyRule, rope_settings

MODEL_TYPES = ("gemma3_text", "gemma3")

# Gemma3TextConfig's defaults (transformers 5.23)
DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
            "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "bos_token_id": 2, "eos_token_id": 1}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _rules(prefix: str) -> tuple[KeyRule, ...]:
    layer = prefix + r"layers\.(\d+)\."
    return (
        KeyRule(prefix + r"embed_tokens\.weight", "embed.weight"),
        KeyRule(layer + r"self_attn\.([qkvo])_proj\.weight", "layers.{0}.attn.{1}_proj.kernel", transpose=True),
        KeyRule(layer + r"self_attn\.([qkvo])_proj\.bias", "layers.{0}.attn.{1}_proj.bias"),
        KeyRule(layer + r"self_attn\.([qk])_norm\.weight", "layers.{0}.attn.{1}_norm.weight"),
        KeyRule(layer + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}_proj.kernel", transpose=True),
        KeyRule(layer + r"input_layernorm\.weight", "layers.{0}.input_norm.weight"),
        KeyRule(layer + r"post_attention_layernorm\.weight", "layers.{0}.attn_out_norm.weight"),
        KeyRule(layer + r"pre_feedforward_layernorm\.weight", "layers.{0}.post_attn_norm.weight"),
        KeyRule(layer + r"post_feedforward_layernorm\.weight", "layers.{0}.mlp_out_norm.weight"),
        KeyRule(prefix + r"norm\.weight", "final_norm.weight"),
    )


# Gemma3ForCausalLM's names first (what export writes), then the multimodal checkpoints' text tower: transformers
# >= 4.52 ``model.language_model.``, older ``language_model.model.``.
KEY_RULES = (
    *_rules(r"model\."),
    *_rules(r"model\.language_model\."),
    *_rules(r"language_model\.model\."),
    KeyRule(r"(?:language_model\.)?lm_head\.weight", "lm_head.kernel", transpose=True, unless_tied=True),
    KeyRule(r"(?:model\.)?(?:vision_tower|multi_modal_projector)\..*", None),
)


def text_config(hf: dict) -> dict:
    """The text model's config.json fields: ``hf`` itself for gemma3_text, its ``text_config`` (with the
    top-level token ids and tie flag it lacks) for gemma3."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf_field(hf, "text_config", "object", {})
    inherited = {k: hf[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id") if k in hf}
    return {**inherited, **text, "model_type": "gemma3"}


def _get(hf: dict, key: str | tuple[str, ...], kind: str) -> Any:
    keys = (key,) if isinstance(key, str) else key
    return hf_field(hf, keys, kind, DEFAULTS.get(keys[0]))


def _rope(hf: dict) -> tuple[float, tuple | None, float]:
    """(global theta, global rope_scaling items, local theta) from transformers 5's per-layer-type
    ``rope_parameters`` or transformers 4's rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf_field(hf, "rope_parameters", "object", None)
    if params is not None and ("full_attention" in params or "sliding_attention" in params):
        full = hf_field(params, "full_attention", "object", {}, where="rope_parameters.")
        local = hf_field(params, "sliding_attention", "object", {}, where="rope_parameters.")
    else:
        full = {**(params or {}), **(hf_field(hf, "rope_scaling", "object", None) or {})}
        full.setdefault("rope_theta", _get(hf, "rope_theta", "positive"))
        local = {"rope_theta": _get(hf, "rope_local_base_freq", "positive")}
    full = {"rope_theta": DEFAULTS["rope_theta"], **full}
    hf_field(full, "rope_theta", "positive", where="rope_parameters.full_attention.")
    local_theta = hf_field(local, "rope_theta", "positive", DEFAULTS["rope_local_base_freq"],
                           where="rope_parameters.sliding_attention.")
    if local.get("rope_type", "default") != "default":
        raise CheckpointError(f"config.json: the sliding-window layers' rope_type {local['rope_type']!r} is not "
                              f"supported (Gemma 3's is 'default')")
    theta, scaling = rope_settings({"rope_parameters": full})
    if scaling is not None:
        check_rope_scaling(dict(scaling), "config.json: rope_parameters.full_attention", CheckpointError)
    return theta, scaling, local_theta


def config_from_hf(hf: dict) -> ModelConfig:
    """`ModelConfig` of a Gemma 3 config.json (text tower); every field it reads is checked first."""
    hf = text_config(hf)
    act = hf_field(hf, ("hidden_activation", "hidden_act"), "str", GELU_TANH[0])
    if act not in GELU_TANH:
        raise CheckpointError(f"config.json: Gemma 3 with hidden_activation {act!r}; only the tanh GELU "
                              f"({GELU_TANH[0]!r}) is supported")
    if hf_field(hf, "use_bidirectional_attention", "bool", False):
        raise CheckpointError("config.json: use_bidirectional_attention is true (an embedding model); only causal "
                              "Gemma 3 models are supported")
    layers = _get(hf, "num_hidden_layers", "int")
    window = _get(hf, "sliding_window", "int")
    types = hf_layer_types(hf, layers)
    if types is None:
        pattern = _get(hf, "sliding_window_pattern", "int")
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    theta, scaling, local_theta = _rope(hf)
    bias = hf_field(hf, "attention_bias", "bool", False)
    heads = _get(hf, "num_attention_heads", "int")
    return ModelConfig(
        model_type=hf.get("model_type", "gemma3_text"), vocab_size=_get(hf, "vocab_size", "int"),
        hidden_size=_get(hf, "hidden_size", "int"), intermediate_size=_get(hf, "intermediate_size", "int"),
        num_layers=layers, num_heads=heads, num_kv_heads=_get(hf, "num_key_value_heads", "int"),
        head_dim=_get(hf, "head_dim", "int"), norm="rms", norm_eps=_get(hf, "rms_norm_eps", "positive"),
        position="rope", mlp="geglu", attn_bias=bias, attn_out_bias=bias,
        tie_embeddings=hf_field(hf, "tie_word_embeddings", "bool", True), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=_get(hf, "max_position_embeddings", "int"),
        bos_token_id=hf_field(hf, "bos_token_id", "token_id", DEFAULTS["bos_token_id"]),
        eos_token_id=hf_field(hf, "eos_token_id", "token_ids", DEFAULTS["eos_token_id"]),
        qk_norm=True, norm_plus_one=True, sandwich_norms=True, embed_scale=True,
        query_pre_attn_scalar=_get(hf, "query_pre_attn_scalar", "positive"),
        # attn_logit_softcapping is not read: transformers' Gemma 3 does not apply it (Gemma 2 did)
        final_softcap=hf_field(hf, "final_logit_softcapping", "positive", None),
        sliding_window=window if "sliding_attention" in types else None,
        layer_types=types if "sliding_attention" in types else None, rope_local_theta=local_theta)
