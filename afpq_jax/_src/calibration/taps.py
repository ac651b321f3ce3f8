"""Jitted passes over one decoder block: plain forwards, and taps on the inputs of its linear layers.

The block's graphdef is a static argument, so every block of a model shares one compilation per pass. Layers fed
the same array (q/k/v, gate/up) share one tap: results are keyed by the comma-joined names of the layers that
share an input.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src.layers import record_inputs
from afpq_jax._src.models.transformer import block_linears
from afpq_jax._src.sharding import device_batch, to_host

_HIGHEST = jax.lax.Precision.HIGHEST
@dataclasses.dataclass(frozen=True)
class Statistic:
    """A reduction over a linear layer's inputs, accumulated over every calibration token.

    ``per_batch(x)`` maps one minibatch's inputs ``x`` (tokens, K) in float32 to an array; results of successive
    minibatches are combined with ``combine`` ("sum" or "max"). Instances are static jit arguments: define them
    once at module level.
    """

    name: str
    per_batch: Callable[[jax.Array], jax.Array]
    combine: str = "sum"

    def __post_init__(self) -> None:
        if self.combine not in ("sum", "max"):
            raise ValueError(f"Statistic.combine must be 'sum' or 'max', got {self.combine!r}")


XTX = Statistic("xtx", lambda x: jnp.matmul(x.T, x, precision=_HIGHEST))  # GPTQ's Hessian, unnormalised
ABS_SUM = Statistic("abs_sum", lambda x: jnp.sum(jnp.abs(x), axis=0))  # AWQ's mean |x| per channel, times tokens
ABS_MAX = Statistic("abs_max", lambda x: jnp.max(jnp.abs(x), axis=0), combine="max")  # per input channel

TOKEN_MAX_BINS_PER_OCTAVE = 4
TOKEN_MAX_OFFSET = 80  # bin 0 starts at 2**-20; the last of 160 bins ends at 2**20 (values beyond are clamped)


def _token_max_histogram(x: jax.Array) -> jax.Array:
    m = jnp.max(jnp.abs(x), axis=-1)
    b = jnp.floor(jnp.log2(jnp.maximum(m, 1e-30)) * TOKEN_MAX_BINS_PER_OCTAVE).astype(jnp.int32)
    b = jnp.clip(b + TOKEN_MAX_OFFSET, 0, 2 * TOKEN_MAX_OFFSET - 1)
    return jnp.zeros((2 * TOKEN_MAX_OFFSET,), jnp.float32).at[b].add(1.0)


# Histogram of each token's max|x| over quarter-octave bins: how much the per-token ranges vary (FPTQ's rule).
TOKEN_MAX_HIST = Statistic("token_max_hist", _token_max_histogram)


def histogram_quantile(counts, q: float) -> float:
    """The lower edge of the `TOKEN_MAX_HIST` bin holding quantile ``q`` (within a factor 2**0.25)."""
    counts = np.asarray(counts, np.float64)
    b = int(np.searchsorted(np.cumsum(counts), q * counts.sum(), side="left"))
    return float(2.0 ** ((b - TOKEN_MAX_OFFSET) / TOKEN_MAX_BINS_PER_OCTAVE))


def minibatches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def minibatch_size(n: int, batch_size: int) -> int:
    """The largest divisor of ``n`` up to ``batch_size``: ``n`` sequences as equal minibatches."""
    return max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)


@functools.partial(jax.jit, static_argnums=0)
def block_apply(graphdef, state, x, positions):
    return nnx.merge(graphdef, state)(x, positions)[0]


def _forward_and_inputs(graphdef, state, x, positions) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One block forward: (output, {comma-joined layer names: input})."""
    block = nnx.merge(graphdef, state)
    with record_inputs() as taps:
        out = block(x, positions)[0]
    names = {id(m): n for n, m in block_linears(block).items()}
    groups: dict[int, list] = {}
    for module, inp in taps:
        groups.setdefault(id(inp), [[], inp])[0].append(names[id(module)])
    return out, {",".join(layer_names): inp for layer_names, inp in groups.values()}


def _distinct_inputs(graphdef, state, x, positions) -> dict[str, jax.Array]:
    """{comma-joined layer names: input} for one block forward."""
    return _forward_and_inputs(graphdef, state, x, positions)[1]


_block_inputs = jax.jit(_distinct_inputs, static_argnums=0)


def _reduce(statistics, wanted: frozenset[str], inputs: dict[str, jax.Array]):
    out = {}
    for key, inp in inputs.items():
        if wanted.isdisjoint(key.split(",")):
            continue
        flat = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
        out[key] = {s.name: s.per_batch(flat) for s in statistics}
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_statistics(graphdef, statistics: tuple[Statistic, ...], wanted: frozenset[str], state, x, positions):
    return _reduce(statistics, wanted, _distinct_inputs(graphdef, state, x, positions))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _forward_statistics(graphdef, statistics: tuple[Statistic, ...], wanted: frozenset[str], state, x, positions):
    out, inputs = _forward_and_inputs(graphdef, state, x, positions)
    return out, _reduce(statistics, wanted, inputs)


def _combine(total, stats, statistics):
    if total is None:
        return stats
    return {k: {s.name: (v[s.name] + total[k][s.name] if s.combine == "sum"
                         else jnp.maximum(v[s.name], total[k][s.name])) for s in statistics}
            for k, v in stats.items()}


def input_statistics(block, statistics: tuple[Statistic, ...], layers, x_all: np.ndarray, positions,
                     batch_size: int) -> tuple[dict[str, dict[str, jax.Array]], int]:
    """``{layer: {statistic name: value}}`` for the named ``layers`` over every sequence of ``x_all`` (S, L, D),
    and the number of tokens they cover."""
    if not statistics:
        return {}, 0
    graphdef, state = nnx.split(block)
    total, count = None, 0
    for sl in minibatches(len(x_all), batch_size):
        stats = _block_statistics(graphdef, tuple(statistics), frozenset(layers), state, device_batch(x_all[sl]),
                                  positions[: sl.stop - sl.start])
        total = _combine(total, stats, statistics)
        count += (sl.stop - sl.start) * x_all.shape[1]
    total = jax.block_until_ready(total)
    return {name: v for key, v in total.items() for name in key.split(",")}, count


@functools.partial(jax.jit, donate_argnums=0)
def _put_minibatch(buf, x, index):
    return jax.lax.dynamic_update_index_in_dim(buf, x, index, 0)  # in place: ``buf`` is donated


def layer_input(block, x: np.ndarray, positions, batch_size: int, name: str) -> jax.Array:
    """Layer ``name``'s input over the sequences ``x`` (S, L, D) as equal minibatches (S // B, B, L, D'), B =
    `minibatch_size` (S, batch_size); written minibatch by minibatch into one device buffer (a host array copied
    to the device would hold the input twice: measured ~+70 MiB for SmolLM2's down_proj at 16 x 512)."""
    graphdef, state = nnx.split(block)
    b = minibatch_size(len(x), batch_size)
    buf = None
    for index, sl in enumerate(minibatches(len(x), b)):
        inputs = _block_inputs(graphdef, state, device_batch(x[sl]), positions[:b])
        v = next(v for key, v in inputs.items() if name in key.split(",")).astype(jnp.float32)
        if buf is None:
            buf = jnp.zeros((len(x) // b, *v.shape), jnp.float32)
        buf = _put_minibatch(buf, v, index)
    return buf


def sampled_inputs(block, x: np.ndarray, positions, batch_size: int,
                   rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named layers' inputs over the sequences ``x`` at flat token indices ``rows[name]``, in that order
    (T, D); only the sampled rows are kept."""
    graphdef, state = nnx.split(block)
    out: dict[str, np.ndarray] = {}
    seqlen = x.shape[1]
    for sl in minibatches(len(x), batch_size):
        for key, v in _block_inputs(graphdef, state, device_batch(x[sl]), positions[: sl.stop - sl.start]).items():
            wanted = [name for name in key.split(",") if name in rows]
            if not wanted:
                continue
            flat = to_host(v).astype(np.float32).reshape(-1, v.shape[-1])
            for name in wanted:
                idx = rows[name]
                here = (idx >= sl.start * seqlen) & (idx < sl.stop * seqlen)
                if name not in out:
                    out[name] = np.empty((len(idx), v.shape[-1]), np.float32)
                out[name][here] = flat[idx[here] - sl.start * seqlen]
    return out


def forward(block, x_all: np.ndarray, positions, batch_size: int, *, statistics: tuple[Statistic, ...] = (),
            layers=(), write: bool = True) -> dict[str, dict[str, jax.Array]]:
    """Overwrites ``x_all`` (S, L, D), minibatch by minibatch, with ``block``'s outputs (unless ``write`` is
    False), and accumulates ``statistics`` of the named ``layers``' inputs in the same pass:
    ``{layer: {statistic name: value}}`` (empty without statistics)."""
    graphdef, state = nnx.split(block)
    total = None
    for sl in minibatches(len(x_all), batch_size):
        x, pos = device_batch(x_all[sl]), positions[: sl.stop - sl.start]
        if statistics:
            out, stats = _forward_statistics(graphdef, tuple(statistics), frozenset(layers), state, x, pos)
            total = _combine(total, stats, statistics)
        else:
            out = block_apply(graphdef, state, x, pos)
        if write:
            x_all[sl] = to_host(out)
    if total is None:
        return {}
    total = jax.block_until_ready(total)
    return {name: v for key, v in total.items() for name in key.split(",")}
