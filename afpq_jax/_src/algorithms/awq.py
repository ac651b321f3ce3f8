"""AWQ (Lin et al. 2024) activation-aware scaling with any afpq-jax format quantizing inside the search.

Per block, for each *scaling group* (a preceding op and the linears it feeds), try ``s = mean|x|^alpha``
(normalised by sqrt(max*min)) for alpha on a grid of 20, quantize the scaled kernels ``Q(W * s) / s`` with the
target format (asymmetric FP/NF included) and keep the alpha minimising the inspected module's output MSE on
calibration inputs. The chosen ``s`` multiplies the linears' input rows and is divided out of the preceding op,
which leaves the float model's function unchanged:

* input_norm -> q/k/v (BLOOM: query_key_value); post_attn_norm -> gate/up (BLOOM: dense_h_to_4h),
* v_proj -> o_proj when their shapes match (no GQA, unfused),
* up_proj -> down_proj (LLaMA); BLOOM's GELU output -> dense_4h_to_h through ``MLP.act_scale``.
alpha = 0 (s = 1) is in the grid, so the search never does worse than RTN on its own loss.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src.layers import LayerNorm, QuantDense, QuantScheme, RMSNorm
from afpq_jax._src.models.config import ModelConfig
from afpq_jax._src.quantizer import fake_quant


@dataclasses.dataclass(frozen=True)
class ScalingGroup:
    prev: str  # path in the block of the op the scale is folded into (norm, linear, or mlp.act_scale)
    layers: tuple[str, ...]  # linears whose input rows are scaled
    inspect: str  # module whose output the search compares ("attn", "mlp" or a linear's path)


def scaling_groups(cfg: ModelConfig) -> list[ScalingGroup]:
    attn = ("attn.qkv_proj",) if cfg.fused_qkv else ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    groups = [ScalingGroup("input_norm", attn, "attn")]
    if not cfg.fused_qkv and cfg.num_kv_heads == cfg.num_heads:
        groups.append(ScalingGroup("attn.v_proj", ("attn.o_proj",), "attn.o_proj"))
    mlp_in = ("mlp.gate_proj", "mlp.up_proj") if cfg.mlp == "swiglu" else ("mlp.up_proj",)
    groups.append(ScalingGroup("post_attn_norm", mlp_in, "mlp"))
    if cfg.mlp == "swiglu":
        groups.append(ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
    elif cfg.mlp_act_scale:
        groups.append(ScalingGroup("mlp.act_scale", ("mlp.down_proj",), "mlp.down_proj"))
    return groups


def get_path(module, path: str):
    """Submodule / variable at a dotted path ("" = the module itself)."""
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


def fold_scale(block, group: ScalingGroup, s: jax.Array) -> None:
    """Multiplies the group's linears' input rows by ``s`` and divides ``s`` out of the preceding op."""
    for name in group.layers:
        layer = get_path(block, name)
        layer.kernel.set_value(layer.kernel.get_value() * s[:, None].astype(layer.kernel.get_value().dtype))
    prev = get_path(block, group.prev)
    if isinstance(prev, (RMSNorm, LayerNorm)):
        prev.weight.set_value(prev.weight.get_value() / s)
        if isinstance(prev, LayerNorm):
            prev.bias.set_value(prev.bias.get_value() / s)
    elif isinstance(prev, QuantDense):
        prev.kernel.set_value(prev.kernel.get_value() / s[None, :])
        if prev.bias is not None:
            prev.bias.set_value(prev.bias.get_value() / s)
    else:  # MLP.act_scale: h = act(x) / act_scale
        prev.set_value(prev.get_value() * s)


def _inspect_fn(inspect: str):
    """How to run the inspected module on the group's inputs: attention needs positions (no cache)."""
    if inspect == "attn":
        return lambda m, x, positions: m(x, positions, None, 0)[0]
    return lambda m, x, positions: m(x)


@functools.partial(jax.jit, static_argnames=("graphdef", "inspect"))
def _outputs(graphdef, state, xs, positions, *, inspect: str):
    """The float module's outputs for minibatches ``xs`` (M, B, L, D), one minibatch at a time."""
    module = nnx.merge(graphdef, state)
    return jax.lax.map(lambda x: _inspect_fn(inspect)(module, x, positions).astype(jnp.float32), xs)


def _scales(x_mean: jax.Array, alpha) -> jax.Array:
    s = jnp.maximum(x_mean ** alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("graphdef", "inspect", "layer_paths", "scheme"))
def _search_losses(graphdef, state, xs, positions, x_mean, alphas, references, *, inspect: str,
                   layer_paths: tuple[str, ...], scheme: QuantScheme):
    """Output MSE of the inspected module with the group's linears replaced by ``Q(W*s)/s``, for every alpha.

    One program per group kind: alphas one after another (``lax.map``), and for each alpha the minibatches
    one after another (``lax.scan``), so temporaries are one minibatch's (attention scores included)."""
    def loss(alpha):
        s = _scales(x_mean, alpha)
        module = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level
        for path in layer_paths:
            layer = get_path(module, path)
            w = layer.kernel.get_value() * s[:, None]
            wq = fake_quant(w, scheme.format, group_size=scheme.group_size, asym=scheme.asym,
                            scale_dtype=scheme.scale_dtype)
            layer.kernel.set_value(wq / s[:, None])

        def add(total, batch):
            x, ref = batch
            out = _inspect_fn(inspect)(module, x, positions).astype(jnp.float32)
            return total + jnp.sum(jnp.square(out - ref)), None

        total, _ = jax.lax.scan(add, jnp.float32(0), (xs, references))
        return total / references.size

    return jax.lax.map(loss, alphas)


def minibatch_size(n: int, batch_size: int) -> int:
    """The largest divisor of ``n`` up to ``batch_size``: ``n`` sequences as equal minibatches."""
    return max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)


def as_minibatches(x, batch_size: int) -> jax.Array:
    """Sequences (S, L, D) as equal minibatches (S // B, B, L, D), B = `minibatch_size` (S, batch_size)."""
    x = np.asarray(x)
    mb = minibatch_size(len(x), batch_size)
    return jnp.asarray(x.reshape(len(x) // mb, mb, *x.shape[1:]))


def search_scale(block, group: ScalingGroup, x, positions: jax.Array, x_mean: jax.Array,
                 scheme: QuantScheme, n_grid: int = 20, batch_size: int = 4) -> tuple[jax.Array, float, np.ndarray]:
    """Best ``s`` for one scaling group; ``x`` = the group's input on the search sequences, (S, L, D) (run
    ``batch_size`` sequences at a time) or already `as_minibatches` (M, B, L, D); ``positions`` has at least B
    rows; ``x_mean`` = mean |x| per input channel over all calibration tokens.
    Returns (s, best alpha, losses per alpha)."""
    module = get_path(block, group.inspect)
    kind = group.inspect if group.inspect in ("attn", "mlp") else "linear"
    rel = []
    for p in group.layers:  # paths of the group's linears relative to the inspected module
        if p == group.inspect:
            rel.append("")
        elif p.startswith(group.inspect + "."):
            rel.append(p[len(group.inspect) + 1:])
        else:
            raise ValueError(f"scaling group {group}: {p} is not inside {group.inspect}")
    xs = x if np.ndim(x) == 4 else as_minibatches(x, batch_size)
    pos = positions[: xs.shape[1]]
    graphdef, state = nnx.split(module)
    references = _outputs(graphdef, state, xs, pos, inspect=kind)
    alphas = np.arange(n_grid, dtype=np.float32) / n_grid
    losses = np.asarray(_search_losses(graphdef, state, xs, pos, x_mean, jnp.asarray(alphas), references,
                                       inspect=kind, layer_paths=tuple(rel), scheme=scheme))
    best = int(np.argmin(losses))
    return _scales(x_mean, alphas[best]), float(alphas[best]), losses
