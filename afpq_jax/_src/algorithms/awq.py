"""AWQ (Lin et al. 2024) activation-aware scaling with any afpq-jax format quantizing inside the search.

Per block, for each *scaling group* (a preceding op and the linears it feeds), try ``s = mean|x|^alpha``
(normalised by sqrt(max*min)) for alpha on a grid of 20, quantize the scaled kernels ``Q(W * s) / s`` with the
target format (asymmetric FP/NF included) and keep the alpha minimising the inspected module's output MSE on
calibration inputs. The chosen ``s`` multiplies the linears' input rows and is divided out of the preceding op,
which leaves the float model's function unchanged (`algorithms.folds`; AWQ uses its groups without the GQA
v_proj -> o_proj one).
alpha = 0 (s = 1) is in the grid, so the search never does worse than RTN on its own loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src import validation
from afpq_jax._src.algorithms.clip import ClipSearch
from afpq_jax._src.algorithms.folds import ScalingGroup, fold_scale, get_path, scaling_groups
from afpq_jax._src.calibration.method import BlockContext, Method, register_method
from afpq_jax._src.calibration.taps import ABS_SUM, minibatch_size
from afpq_jax._src.sharding import device_minibatches
from afpq_jax._src.memory import trim_heap
from afpq_jax._src.models.config import ModelConfig
from afpq_jax._src.quantizer import fake_quant
from afpq_jax._src.scheme import QuantScheme


def _inspect_fn(inspect: str):
    """How to run the inspected module on the group's inputs: attention needs positions (no cache)."""
    if inspect == "attn":
        return lambda m, x, positions: m(x, positions, None, 0)[0]
    return lambda m, x, positions: m(x)


@functools.partial(jax.jit, static_argnames=("graphdef", "inspect"))
def _outputs(graphdef, state, xs, positions, *, inspect: str):
    """The float module's outputs for minibatches ``xs`` (M, B, L, D), one minibatch at a time."""
    with jax.default_matmul_precision("highest"):  # the search's losses compare against these
        module = nnx.merge(graphdef, state)
        return jax.lax.map(lambda x: _inspect_fn(inspect)(module, x, positions).astype(jnp.float32), xs)


def _scales(x_mean: jax.Array, alpha) -> jax.Array:
    s = jnp.maximum(x_mean ** alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("graphdef", "inspect", "layer_paths", "schemes"))
def _search_losses(graphdef, state, xs, positions, x_mean, alphas, references, *, inspect: str,
                   layer_paths: tuple[str, ...], schemes: tuple[QuantScheme, ...]):
    """Output MSE of the inspected module with the group's linears replaced by ``Q(W*s)/s`` (each layer with its
    own scheme), for every alpha.

    One program per group kind: alphas one after another (``lax.map``), and for each alpha the minibatches
    one after another (``lax.scan``), so temporaries are one minibatch's (attention scores included)."""
    with jax.default_matmul_precision("highest"):  # TPU / GPU would otherwise use bf16 / TF32 passes
        return _search_losses_impl(graphdef, state, xs, positions, x_mean, alphas, references, inspect=inspect,
                                   layer_paths=layer_paths, schemes=schemes)


def _search_losses_impl(graphdef, state, xs, positions, x_mean, alphas, references, *, inspect, layer_paths,
                        schemes):
    def loss(alpha):
        s = _scales(x_mean, alpha)
        module = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level
        for path, scheme in zip(layer_paths, schemes):
            layer = get_path(module, path)
            w = layer.kernel.get_value() * s[:, None]
            wq = fake_quant(w, scheme.format, group_size=scheme.group_size, asym=scheme.asym,
                            scale_dtype=scheme.scale_dtype, integer_scales=scheme.integer_scales)
            layer.kernel.set_value(wq / s[:, None])

        def add(total, batch):
            x, ref = batch
            out = _inspect_fn(inspect)(module, x, positions).astype(jnp.float32)
            return total + jnp.sum(jnp.square(out - ref)), None

        total, _ = jax.lax.scan(add, jnp.float32(0), (xs, references))
        return total / references.size

    return jax.lax.map(loss, alphas)


def as_minibatches(x, batch_size: int) -> jax.Array:
    """Sequences (S, L, D) as equal minibatches (S // B, B, L, D), B = `minibatch_size` (S, batch_size)."""
    x = np.asarray(x)
    mb = minibatch_size(len(x), batch_size)
    return device_minibatches(x.reshape(len(x) // mb, mb, *x.shape[1:]))


def search_scale(block, group: ScalingGroup, x, positions: jax.Array, x_mean: jax.Array,
                 schemes: QuantScheme | tuple[QuantScheme, ...], n_grid: int = 20,
                 batch_size: int = 4) -> tuple[jax.Array, float, np.ndarray]:
    """Best ``s`` for one scaling group; ``x`` = the group's input on the search sequences, (S, L, D) (run
    ``batch_size`` sequences at a time) or already `as_minibatches` (M, B, L, D); ``positions`` has at least B
    rows; ``x_mean`` = mean |x| per input channel over all calibration tokens; ``schemes`` = one per layer of the
    group (or one for all). Returns (s, best alpha, losses per alpha)."""
    if isinstance(schemes, QuantScheme):
        schemes = (schemes,) * len(group.layers)
    if len(schemes) != len(group.layers):
        raise ValueError(f"scaling group {group.layers} needs one scheme per layer, got {len(schemes)}")
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
                                       inspect=kind, layer_paths=tuple(rel), schemes=tuple(schemes)))
    best = int(np.argmin(losses))
    return _scales(x_mean, alphas[best]), float(alphas[best]), losses


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQ(Method):
    """AWQ's scale search and folds per scaling group, then (by default) the two-sided clipping search, then RTN;
    every layer with its own scheme. A scaling group with a float layer is left unscaled."""

    name: ClassVar[str] = "awq"
    grid: int = 20
    clip: ClipSearch | None = dataclasses.field(default_factory=ClipSearch)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", ClipSearch.coerce(self.clip, "AWQ.clip"))

    def validate(self) -> None:
        validation.integer(self.grid, "AWQ grid")
        if self.clip is not None:
            self.clip.validate()

    def statistics(self):
        return (ABS_SUM,)

    def prepare_config(self, cfg: ModelConfig) -> ModelConfig:
        # BLOOM's GELU -> dense_4h_to_h needs a foldable per-channel scale (MLP.act_scale)
        return dataclasses.replace(cfg, mlp_act_scale=True) if cfg.mlp == "gelu" else cfg

    def quantize_block(self, ctx: BlockContext) -> dict[str, Any] | None:
        alphas = {}
        trim_heap()  # each phase's temporaries go before the next phase's (measured: AWQ's peak -30 MiB)
        for group in scaling_groups(ctx.cfg):
            if not all(n in ctx.schemes for n in group.layers):
                continue
            with ctx.timer("forward"):  # this group's input only, one device copy at a time
                xs = ctx.layer_input(group.layers[0])
            with ctx.timer("awq search"):
                x_mean = ctx.stats[group.layers[0]]["abs_sum"] / ctx.tokens
                s, alpha, _ = search_scale(ctx.block, group, xs, ctx.positions, x_mean,
                                           tuple(ctx.schemes[n] for n in group.layers), self.grid)
                del xs
                fold_scale(ctx.block, group, s)
            trim_heap()
            alphas[group.layers[0]] = alpha
        ratios = {}
        if self.clip is not None:
            with ctx.timer("clip search"):
                ratios = self.clip.block_ratios(ctx)
            trim_heap()
        with ctx.timer("quantize"):
            global_scales = ctx.shared_global_scales()  # after the folds, as the clip search took them
            for name, s in ctx.schemes.items():
                # weights only: the activation step (`activations.WithActivations`) sets each input's scheme
                jax.block_until_ready(ctx.linears[name].quantize(s.with_activations(None, None), ratios.get(name),
                                                                 global_scales.get(name)))
        return {"awq_alpha": alphas}
