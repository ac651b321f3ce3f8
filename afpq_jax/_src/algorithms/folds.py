"""Per-channel scale folds: scale a group of linears' input rows by ``s`` and divide ``s`` out of the op that
feeds them, leaving the float model's function unchanged (AWQ, SmoothQuant and FPTQ's LAE all use this).

A `ScalingGroup` is a preceding op and the linears it feeds:

* input_norm -> q/k/v (BLOOM: query_key_value); post_attn_norm -> gate/up (BLOOM: dense_h_to_4h),
* v_proj -> o_proj: with one KV head per query head, or under GQA with ``s`` tied across the query heads that
  share a KV head (``kv_groups`` > 1: o_proj's input (kv, g, d) is v_proj's output (kv, d) repeated g times),
* up_proj -> down_proj (SwiGLU, GeGLU: down(act(gate)·up)); BLOOM's GELU output -> dense_4h_to_h through ``MLP.act_scale``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from afpq_jax._src.layers import LayerNorm, QuantDense, RMSNorm
from afpq_jax._src.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ScalingGroup:
    prev: str  # path in the block of the op the scale is folded into (norm, linear, or mlp.act_scale)
    layers: tuple[str, ...]  # linears whose input rows are scaled
    inspect: str  # module whose output a search compares ("attn", "mlp" or a linear's path)
    kv_groups: int = 1  # > 1: query heads per KV head; s must be equal across them (GQA v_proj -> o_proj)
    head_dim: int = 0


def scaling_groups(cfg: ModelConfig, *, gqa: bool = False) -> list[ScalingGroup]:
    """The foldable groups of a block of ``cfg``; ``gqa=True`` adds v_proj -> o_proj under GQA (tied scales)."""
    attn = ("attn.qkv_proj",) if cfg.fused_qkv else ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    groups = [ScalingGroup("input_norm", attn, "attn")]
    if not cfg.fused_qkv and cfg.num_kv_heads == cfg.num_heads:
        groups.append(ScalingGroup("attn.v_proj", ("attn.o_proj",), "attn.o_proj"))
    elif not cfg.fused_qkv and gqa:
        groups.append(ScalingGroup("attn.v_proj", ("attn.o_proj",), "attn.o_proj",
                                   kv_groups=cfg.num_heads // cfg.num_kv_heads, head_dim=cfg.head_dim))
    mlp_in = ("mlp.gate_proj", "mlp.up_proj") if cfg.gated_mlp else ("mlp.up_proj",)
    groups.append(ScalingGroup("post_attn_norm", mlp_in, "mlp"))
    if cfg.gated_mlp:
        groups.append(ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    elif cfg.mlp_act_scale:
        groups.append(ScalingGroup("mlp.act_scale", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


def get_path(module, path: str):
    """Submodule / variable at a dotted path ("" = the module itself)."""
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


def tie_heads(values: jax.Array, group: ScalingGroup) -> jax.Array:
    """Per-input-channel values (e.g. max|x|) made equal across the query heads that share a KV head (their
    max), as a GQA v_proj -> o_proj fold needs; unchanged for other groups."""
    if group.kv_groups == 1:
        return values
    v = values.reshape(-1, group.kv_groups, group.head_dim)
    return jnp.broadcast_to(jnp.max(v, axis=1, keepdims=True), v.shape).reshape(-1)


def fold_scale(block, group: ScalingGroup, s: jax.Array) -> jax.Array:
    """Multiplies the group's linears' input rows by ``s`` and divides ``s`` out of the preceding op.

    ``s`` is first rounded to the block's parameter dtype, and that one value is used on both sides (a bf16
    model would otherwise multiply the kernel by the rounded scale and divide the norm by the unrounded one).
    Products are formed in float32 and rounded once into each parameter's dtype. Returns the scale used.
    For a tied (GQA) group ``s`` must already be tied (`tie_heads`).
    """
    dtype = get_path(block, group.layers[0]).kernel.get_value().dtype
    s = jnp.asarray(s).astype(dtype).astype(jnp.float32)
    s_prev = s
    if group.kv_groups > 1:
        tied = s.reshape(-1, group.kv_groups, group.head_dim)
        if not bool(jnp.all(tied == tied[:, :1])):
            raise ValueError(f"scales of {group.layers} must be tied across the {group.kv_groups} query heads "
                             f"of each KV head (use tie_heads)")
        s_prev = tied[:, 0].reshape(-1)

    def update(var, fn):
        old = var.get_value()
        var.set_value(fn(old.astype(jnp.float32)).astype(old.dtype))

    for name in group.layers:
        update(get_path(block, name).kernel, lambda w: w * s[:, None])
    prev = get_path(block, group.prev)
    if isinstance(prev, RMSNorm):  # the gain is offset + weight (Gemma's 1 + w)
        update(prev.weight, lambda w: (w + prev.offset) / s_prev - prev.offset)
    elif isinstance(prev, LayerNorm):
        update(prev.weight, lambda w: w / s_prev)
        update(prev.bias, lambda b: b / s_prev)
    elif isinstance(prev, QuantDense):
        update(prev.kernel, lambda w: w / s_prev[None, :])
        if prev.bias is not None:
            update(prev.bias, lambda b: b / s_prev)
    else:  # MLP.act_scale: h = act(x) / act_scale
        update(prev, lambda a: a * s_prev)
    return s
