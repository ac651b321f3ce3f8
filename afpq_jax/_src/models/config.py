"""`ModelConfig`: one decoder-only architecture description; model families differ only in its fields."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from afpq_jax._src.errors import InputError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Static architecture of a decoder-only LM (hashable; the NNX graphdef holds it).

    Family choices are data: ``norm`` ('rms' | 'layer'), ``position`` ('rope' | 'alibi'), ``mlp`` ('swiglu' |
    'gelu'), ``fused_qkv`` (BLOOM's per-head interleaved query_key_value), ``embed_norm`` (BLOOM's
    word_embeddings_layernorm).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: Literal["rms", "layer"]
    norm_eps: float
    position: Literal["rope", "alibi"]
    mlp: Literal["swiglu", "gelu"]
    fused_qkv: bool = False
    attn_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    embed_norm: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict (hashable)
    max_position_embeddings: int = 2048
    mlp_act_scale: bool = False  # AWQ on GELU MLPs: h = gelu(up(x)) / act_scale (a foldable per-channel scale)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"config.{f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                             f"({self.num_kv_heads})")
        if self.position == "rope":
            rtype = self.rope_scaling_dict.get("rope_type", "default")
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise InputError(f"rope_scaling type {rtype!r} is not supported; supported: "
                                 f"{', '.join(SUPPORTED_ROPE_TYPES)}")
            if self.head_dim % 2:
                raise InputError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def max_seq_len(self) -> int:
        return self.max_position_embeddings
