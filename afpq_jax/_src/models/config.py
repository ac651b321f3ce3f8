"""`ModelConfig`: one decoder-only architecture description; model families differ only in its fields.

Also the checks of a Hugging Face config.json's fields (`hf_field`): a user's file, so every value is checked by
type and range before any arithmetic, and a bad one is a one-line `CheckpointError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

from afpq_jax._src import validation
from afpq_jax._src.errors import CheckpointError, InputError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED: Any = object()  # `hf_field`'s default: the key must be present
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names (config.json's layer_types)


def positive_number(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite real number > 0 (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or \
            not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def boolean(value: Any, what: str) -> bool:
    """``value`` if it is a bool (the string "false" or 1 would silently read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{what} must be true or false, got {value!r}")
    return bool(value)


def token_id_or_list(value: Any, what: str) -> int | tuple[int, ...]:
    """One token id (an integer >= 0), or a list of them as a tuple (hashable, as `ModelConfig` is)."""
    if isinstance(value, (list, tuple)):
        return tuple(validation.integer(v, f"{what}[{i}]", minimum=0) for i, v in enumerate(value))
    return validation.integer(value, what, minimum=0)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {value!r}")
    return value


def _json_object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object, got {value!r}")
    return value


# hf_field's kinds: each returns the checked value (converted: a list of ids becomes a tuple) or raises InputError
_KINDS: dict[str, Callable[[Any, str], Any]] = {
    "int": validation.integer,  # a positive integer
    "token_id": lambda v, what: validation.integer(v, what, minimum=0),
    "token_ids": token_id_or_list,  # one id or a list (as a tuple)
    "positive": positive_number,
    "bool": boolean,
    "str": _string,
    "object": _json_object,
}


def _checked(check: Callable[..., Any], value: Any, what: str, error: type[InputError] = InputError,
             **kw: Any) -> Any:
    """``check(value, what)``, its message raised as ``error`` and followed by the JSON type that a repr hides
    (``got '1e-5' (a string)``, ``got True (a boolean)``)."""
    try:
        return check(value, what, **kw)
    except InputError as e:
        note = " (a string)" if isinstance(value, str) else " (a boolean)" if isinstance(value, bool) else ""
        raise error(f"{e}{note}") from None


def hf_field(hf: Mapping[str, Any], key: str | tuple[str, ...], kind: str, default: Any = REQUIRED, *,
             where: str = "") -> Any:
    """config.json's ``key`` checked to be ``kind`` (see `_KINDS`); absent or null gives ``default``, and without
    one it is an error. ``key`` may be a tuple of aliases (the first present is read); ``where`` names an enclosing
    object (``"rope_parameters."``). Raises `CheckpointError` "config.json: <key> must be ..., got ...".
    """
    keys = (key,) if isinstance(key, str) else key
    name = next((k for k in keys if hf.get(k) is not None), None)
    if name is None:
        if default is REQUIRED:
            aliases = "".join(f" (or {k!r})" for k in keys[1:])
            raise CheckpointError(f"config.json has no {where + keys[0]!r}{aliases}; a {hf.get('model_type')} "
                                  f"model's config.json must have it (restore the model's original config.json)")
        return default
    return _checked(_KINDS[kind], hf[name], f"config.json: {where}{name}", CheckpointError)


def hf_layer_types(hf: Mapping[str, Any], num_layers: int) -> tuple[str, ...] | None:
    """config.json's ``layer_types`` (each 'full_attention' or 'sliding_attention', one per layer) as a tuple,
    or None when absent; a wrong length or an unknown type is a `CheckpointError`."""
    types = hf.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        shown = repr(types) if len(repr(types)) <= 80 else f"{repr(types)[:77]}..."
        raise CheckpointError(f"config.json: layer_types must be a list of {num_layers} entries (num_hidden_layers), "
                              f"each one of {', '.join(map(repr, LAYER_TYPES))}; got {shown}")
    return tuple(types)


def check_rope_scaling(scaling: Mapping[str, Any], what: str, error: type[InputError] = InputError) -> None:
    """The entries `rope_inv_freq` reads for ``scaling``'s rope_type are present and in range (a missing one
    failed at the first forward pass; a zero factor or equal llama3 band factors gave inf/NaN frequencies)."""
    rtype = scaling.get("rope_type", "default")
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise error(f"rope_scaling type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")}.get(rtype, ())
    values = {}
    for key in needed:
        if scaling.get(key) is None:
            raise error(f"{what} has no {key!r}; rope_type {rtype!r} needs it")
        check = validation.integer if key == "original_max_position_embeddings" else positive_number
        values[key] = _checked(check, scaling[key], f"{what}.{key}", error)
    if rtype == "llama3" and values["high_freq_factor"] <= values["low_freq_factor"]:
        raise error(f"{what}: high_freq_factor ({values['high_freq_factor']}) must be greater than "
                    f"low_freq_factor ({values['low_freq_factor']})")


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "max_position_embeddings")
_BOOL_FIELDS = ("fused_qkv", "attn_bias", "attn_out_bias", "mlp_bias", "embed_norm", "tie_embeddings",
                "mlp_act_scale", "qk_norm", "norm_plus_one", "sandwich_norms", "embed_scale")
_CHOICES = {"norm": ("rms", "layer"), "position": ("rope", "alibi"), "mlp": ("swiglu", "geglu", "gelu")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Static architecture of a decoder-only LM (hashable; the NNX graphdef holds it).

    Family choices are data: ``norm`` ('rms' | 'layer'), ``position`` ('rope' | 'alibi'), ``mlp`` ('swiglu':
    down(silu(gate)·up) | 'geglu': down(gelu_tanh(gate)·up) | 'gelu': down(gelu_tanh(up))), ``fused_qkv`` (BLOOM's
    per-head interleaved query_key_value), ``embed_norm`` (BLOOM's word_embeddings_layernorm).

    Gemma / Qwen3 switches: ``qk_norm`` (RMSNorm over head_dim on q and k before RoPE), ``norm_plus_one`` (every
    RMSNorm is Gemma's ``(1 + w)`` in float32), ``sandwich_norms`` (Gemma's norms on the attention and MLP outputs
    before each residual add), ``embed_scale`` (embeddings × sqrt(hidden), rounded to the weight dtype),
    ``query_pre_attn_scalar`` (scores × its ^-1/2 instead of head_dim^-1/2), ``final_softcap`` (``c·tanh(x/c)``
    on the logits). ``layer_types``: per layer 'full_attention' or 'sliding_attention'
    (a query sees the ``sliding_window`` latest keys, itself included), None = all full; sliding layers use
    ``rope_local_theta`` (default RoPE) when it is set, else the global RoPE settings.
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
    mlp: Literal["swiglu", "geglu", "gelu"]
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
    qk_norm: bool = False
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every field by type and range (a string eps or a zero rope_theta made a model that gives NaN)."""
        _checked(_string, self.model_type, "config.model_type")
        for f in _INT_FIELDS:
            _checked(validation.integer, getattr(self, f), f"config.{f}")
        for f in _BOOL_FIELDS:
            _checked(boolean, getattr(self, f), f"config.{f}")
        for f, choices in _CHOICES.items():
            if getattr(self, f) not in choices:
                raise InputError(f"config.{f} must be one of {', '.join(map(repr, choices))}, got "
                                 f"{getattr(self, f)!r}")
        _checked(positive_number, self.norm_eps, "config.norm_eps")
        _checked(positive_number, self.rope_theta, "config.rope_theta")
        if self.bos_token_id is not None:
            _checked(validation.integer, self.bos_token_id, "config.bos_token_id", minimum=0)
        if isinstance(self.eos_token_id, list):  # unhashable: the graphdef could not hold the config
            raise InputError(f"config.eos_token_id must be an integer or a tuple of them, got a list "
                             f"{self.eos_token_id!r}")
        if self.eos_token_id is not None:
            _checked(token_id_or_list, self.eos_token_id, "config.eos_token_id")
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                             f"({self.num_kv_heads})")
        if self.rope_scaling is not None and not (
                isinstance(self.rope_scaling, tuple)
                and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.rope_scaling)):
            raise InputError(f"config.rope_scaling must be a tuple of (key, value) pairs or None, got "
                             f"{self.rope_scaling!r}")
        if self.position == "rope":
            check_rope_scaling(self.rope_scaling_dict, "rope_scaling")
            if self.head_dim % 2:
                raise InputError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for f in ("query_pre_attn_scalar", "final_softcap", "rope_local_theta"):
            if getattr(self, f) is not None:
                _checked(positive_number, getattr(self, f), f"config.{f}")
        if self.sliding_window is not None:
            _checked(validation.integer, self.sliding_window, "config.sliding_window")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers or \
                    any(t not in LAYER_TYPES for t in self.layer_types):
                raise InputError(f"config.layer_types must be a tuple of {self.num_layers} entries, each one of "
                                 f"{', '.join(map(repr, LAYER_TYPES))}; got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise InputError("config.layer_types has sliding_attention layers but sliding_window is not set")
        if self.position == "alibi" and (self.qk_norm or self.layer_types is not None):
            raise InputError("qk_norm and layer_types are RoPE-model features; ALiBi models have neither")

    @property
    def gated_mlp(self) -> bool:
        """down(act(gate(x)) * up(x)) (SwiGLU, GeGLU): up_proj's output channels can carry a folded scale."""
        return self.mlp in ("swiglu", "geglu")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (keys a query sees, itself included), None for full attention."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def max_seq_len(self) -> int:
        return self.max_position_embeddings
