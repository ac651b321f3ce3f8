"""Model families: each supplies `MODEL_TYPES`, `KEY_RULES` and `config_from_hf`; the network is shared."""

from __future__ import annotations

from types import ModuleType

from afpq_jax._src.errors import InputError
from afpq_jax._src.models import bloom, llama
from afpq_jax._src.models.config import ModelConfig
from afpq_jax._src.models.transformer import CausalLM, linear_paths

FAMILIES: dict[str, ModuleType] = {t: fam for fam in (llama, bloom) for t in fam.MODEL_TYPES}


def family_for(hf_config: dict) -> ModuleType:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise InputError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf(hf_config: dict) -> ModelConfig:
    return family_for(hf_config).config_from_hf(hf_config)


__all__ = ["CausalLM", "FAMILIES", "ModelConfig", "config_from_hf", "family_for", "linear_paths"]
