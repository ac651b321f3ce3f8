"""Model families: each supplies `MODEL_TYPES`, `KEY_RULES` and `config_from_hf`; the network is shared."""

from __future__ import annotations

from types import ModuleType

from afpq_jax._src.errors import CheckpointError, InputError
from afpq_jax._src.models import bloom, gemma3, llama, qwen
from afpq_jax._src.models.config import ModelConfig
from afpq_jax._src.models.transformer import CausalLM, linear_paths

FAMILIES: dict[str, ModuleType] = {t: fam for fam in (llama, bloom, gemma3, qwen) for t in fam.MODEL_TYPES}


def family_for(hf_config: dict) -> ModuleType:
    """The family module for a config.json's ``model_type``."""
    _check_object(hf_config)
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:  # a list would not even hash
        raise InputError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf(hf_config: dict) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config.json (as a dict); a missing or bad field is a one-line
    `CheckpointError` naming its key."""
    return family_for(hf_config).config_from_hf(hf_config)


def _check_object(hf_config: object) -> None:
    # converted checkpoints' config.json reaches here without `sources.open_source`'s check
    if not isinstance(hf_config, dict):
        shown = repr(hf_config) if len(repr(hf_config)) <= 40 else f"{repr(hf_config)[:37]}..."
        raise CheckpointError(f"config.json must be a JSON object ({{...}}), got {shown}; restore the model's "
                              f"original config.json")


__all__ = ["CausalLM", "FAMILIES", "ModelConfig", "config_from_hf", "family_for", "linear_paths"]
