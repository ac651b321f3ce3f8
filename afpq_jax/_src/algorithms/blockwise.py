"""Block-by-block calibrated quantization (the AutoGPTQ / llm-compressor pipeline) for GPTQ, AWQ and RTN+clip.

Embed N calibration windows, then for each decoder block i: read block i's float weights from the checkpoint
(random access, nothing else of the model's blocks is in memory), run the method on the block's inputs,
and overwrite the inputs *in place*, minibatch by minibatch, with the quantized block's outputs, which are
block i+1's inputs. Memory: the embeddings, one float block, one activation buffer (N x L x hidden float32)
and the packed blocks done so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from afpq_jax._src.algorithms import awq
from afpq_jax._src.algorithms.clip import clip_search
from afpq_jax._src.algorithms.gptq import gptq_quantize
from afpq_jax._src.io.sources import Source
from afpq_jax._src.layers import QuantScheme, record_inputs
from afpq_jax._src.memory import release_freed_memory, trim_heap
from afpq_jax._src.loading import (_check_shape, _dotted, _place, _place_quantized, abstract_model, init_derived,
                                   merge, model_path_of)
from afpq_jax._src.models import CausalLM, ModelConfig
from afpq_jax._src.models.params import to_model_layout
from afpq_jax._src.models.transformer import Block, block_linears

METHODS = ("rtn", "gptq", "awq")
NO_CLIP = ("attn.q_proj", "attn.k_proj", "attn.qkv_proj")  # as AWQ/BitDistiller: q/k errors are softmax-damped


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
    """How calibration data are drawn and how the methods use them (frozen; `validate` checks ranges)."""

    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 2  # sequences per forward pass (4 at L=512: +73 MiB of temporaries, no faster)
    search_samples: int = 16  # sequences AWQ's scale search and the clip search look at
    search_batch_size: int = 2  # sequences per step of AWQ's search (bounds its attention temporaries)
    clip_tokens: int = 512  # tokens sampled (from the search sequences) for the clipping search
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    awq_grid: int = 20

    def validate(self) -> None:
        for f in ("samples", "seqlen", "batch_size", "search_samples", "search_batch_size", "clip_tokens",
                  "block_size", "awq_grid"):
            if getattr(self, f) <= 0:
                raise ValueError(f"calibration option {f} must be positive, got {getattr(self, f)}")
        if self.seqlen < 2:
            raise ValueError("--calib-seqlen must be at least 2")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")


def sample_windows(token_ids, samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """``samples`` random windows of ``seqlen`` tokens (as GPTQ/AWQ draw their calibration set)."""
    ids = np.asarray(token_ids, np.int32).reshape(-1)
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens, not more than --calib-seqlen {seqlen}; use a "
                         f"longer text or a shorter sequence length")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen, samples)
    return np.stack([ids[s:s + seqlen] for s in starts])


# ---- jitted block passes (graphdef static: every block of a model shares one compilation) -------------------

@functools.partial(jax.jit, static_argnums=0)
def _block_apply(graphdef, state, x, positions):
    return nnx.merge(graphdef, state)(x, positions)[0]


def _tapped_forward(graphdef, state, x, positions) -> list[tuple[str, jax.Array]]:
    """(layer path, input) for every linear call of one block forward."""
    block = nnx.merge(graphdef, state)
    with record_inputs() as taps:
        block(x, positions)
    names = {id(m): n for n, m in block_linears(block).items()}
    return [(names[id(m)], inp) for m, inp in taps]


def _distinct_inputs(graphdef, state, x, positions) -> dict[str, jax.Array]:
    """{comma-joined layer names: input} for one block forward; layers fed the same array share one entry."""
    groups: dict[int, list] = {}
    for name, inp in _tapped_forward(graphdef, state, x, positions):
        groups.setdefault(id(inp), [[], inp])[0].append(name)
    return {",".join(names): inp for names, inp in groups.values()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _block_input_stats(graphdef, want_xtx: bool, state, x, positions):
    """Per distinct linear input: sum x^T x or sum |x|, keyed as `_distinct_inputs`."""
    out = {}
    for key, inp in _distinct_inputs(graphdef, state, x, positions).items():
        flat = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
        out[key] = (jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST) if want_xtx
                    else jnp.sum(jnp.abs(flat), axis=0))
    return out


_block_inputs = jax.jit(_distinct_inputs, static_argnums=0)


@functools.partial(jax.jit, donate_argnums=0)
def _put_minibatch(buf, x, index):
    return jax.lax.dynamic_update_index_in_dim(buf, x, index, 0)  # in place: ``buf`` is donated


def _layer_input(graphdef, state, x: np.ndarray, positions, batch: int, name: str) -> jax.Array:
    """Layer ``name``'s input over the sequences ``x`` (S, L, D) as equal minibatches (S // B, B, L, D'), B =
    `awq.minibatch_size` (S, batch); written minibatch by minibatch into one device buffer (a host array copied
    to the device would hold the input twice: measured ~+70 MiB for SmolLM2's down_proj at 16 x 512)."""
    b = awq.minibatch_size(len(x), batch)
    buf = None
    for index, sl in enumerate(_minibatches(len(x), b)):
        inputs = _block_inputs(graphdef, state, jnp.asarray(x[sl]), positions[:b])
        v = next(v for key, v in inputs.items() if name in key.split(",")).astype(jnp.float32)
        if buf is None:
            buf = jnp.zeros((len(x) // b, *v.shape), jnp.float32)
        buf = _put_minibatch(buf, v, index)
    return buf


def _sampled_inputs(graphdef, state, x: np.ndarray, positions, batch: int,
                    rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named layers' inputs over the sequences ``x`` at flat token indices ``rows[name]``, in that order
    (T, D); only the sampled rows are kept."""
    out: dict[str, np.ndarray] = {}
    seqlen = x.shape[1]
    for sl in _minibatches(len(x), batch):
        for key, v in _block_inputs(graphdef, state, jnp.asarray(x[sl]), positions[: sl.stop - sl.start]).items():
            wanted = [name for name in key.split(",") if name in rows]
            if not wanted:
                continue
            flat = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
            for name in wanted:
                idx = rows[name]
                here = (idx >= sl.start * seqlen) & (idx < sl.stop * seqlen)
                if name not in out:
                    out[name] = np.empty((len(idx), v.shape[-1]), np.float32)
                out[name][here] = flat[idx[here] - sl.start * seqlen]
    return out


class _Timer:
    """Accumulates wall time per phase: ``with timer("gptq"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - t0


def _minibatches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _stats_over(graphdef, state, x_all: np.ndarray, positions, batch: int, want_xtx: bool):
    total, count = None, 0
    for sl in _minibatches(len(x_all), batch):
        stats = _block_input_stats(graphdef, want_xtx, state, jnp.asarray(x_all[sl]), positions[: sl.stop - sl.start])
        total = stats if total is None else {k: total[k] + v for k, v in stats.items()}
        count += (sl.stop - sl.start) * x_all.shape[1]
    total = jax.block_until_ready(total)  # the forward's time lands in its own phase
    return {name: v for key, v in total.items() for name in key.split(",")}, count


# ---- the methods, one block at a time -----------------------------------------------------------------

def _clip_ratios(block, layer_names, search_x, positions, scheme, opts, rng):
    """Clip-search ratios for the block's linears (not q/k), on tokens sampled from the search sequences (only
    the sampled rows are kept)."""
    n_tokens = search_x.shape[0] * search_x.shape[1]
    rows = {name: rng.choice(n_tokens, size=min(opts.clip_tokens, n_tokens), replace=False)
            for name in layer_names if name not in NO_CLIP}
    graphdef, state = nnx.split(block)
    inputs = _sampled_inputs(graphdef, state, search_x, positions, opts.batch_size, rows)
    ratios = {}
    for name in rows:
        ratios[name], _ = clip_search(block_linears(block)[name].kernel.get_value(), inputs.pop(name),
                                      scheme.format, group_size=scheme.group_size, asym=scheme.asym,
                                      scale_dtype=scheme.scale_dtype)
    return jax.block_until_ready(ratios)


def quantize_block(block: Block, cfg: ModelConfig, x_all: np.ndarray, positions, layers: Mapping[str, QuantScheme],
                   method: str, clip: bool, opts: CalibrationOptions, timer: _Timer, rng) -> dict:
    """Quantizes ``block``'s linears named in ``layers`` in place (AWQ also rescales its float ops).
    Returns per-block diagnostics."""
    linears = block_linears(block)
    scheme = next(iter(layers.values()))
    info: dict = {}
    search_x = x_all[: opts.search_samples]
    if method == "gptq":
        graphdef, state = nnx.split(block)
        with timer("forward+hessian"):
            xtx, count = _stats_over(graphdef, state, x_all, positions, opts.batch_size, want_xtx=True)
        with timer("gptq"):
            for name, s in layers.items():
                qt = gptq_quantize(linears[name].kernel.get_value(), xtx[name] * (2.0 / count), s.format,
                                   group_size=s.group_size, asym=s.asym, scale_dtype=s.scale_dtype, damp=opts.damp,
                                   block_size=opts.block_size, act_order=opts.act_order)
                linears[name].set_quantized(jax.block_until_ready(qt))  # time lands in this phase
        return info
    if method == "awq":
        graphdef, state = nnx.split(block)
        with timer("forward"):
            abs_sum, count = _stats_over(graphdef, state, x_all, positions, opts.batch_size, want_xtx=False)
        trim_heap()  # each phase's temporaries go before the next phase's (measured: AWQ's peak -30 MiB)
        alphas = {}
        for group in awq.scaling_groups(cfg):
            if not all(n in layers for n in group.layers):
                continue
            with timer("forward"):  # this group's input only, one copy (device): one group's activations at a time
                graphdef, state = nnx.split(block)
                xs = _layer_input(graphdef, state, search_x, positions, opts.search_batch_size, group.layers[0])
            with timer("awq search"):
                s, alpha, _ = awq.search_scale(block, group, xs, positions, abs_sum[group.layers[0]] / count, scheme,
                                               opts.awq_grid)
                del xs
                awq.fold_scale(block, group, s)
            trim_heap()
            alphas[group.layers[0]] = alpha
        info["awq_alpha"] = alphas
    ratios = {}
    if clip:
        with timer("clip search"):
            ratios = _clip_ratios(block, [n for n in layers], search_x, positions, scheme, opts, rng)
        trim_heap()
    with timer("quantize"):
        for name, s in layers.items():
            jax.block_until_ready(linears[name].quantize(s, ratios.get(name)))
    return info


# ---- the driver --------------------------------------------------------------------------------------------

def _dequantized_float_state(block: Block, float_state):
    """``float_state`` (the block's state before quantization) refilled with the block's current values, with
    each quantized kernel replaced by its dequantized weight."""
    linears = block_linears(block)
    current = dict(nnx.to_flat_state(nnx.state(block)))
    flat = dict(nnx.to_flat_state(float_state))
    for key, var in flat.items():
        layer = ".".join(map(str, key[:-1]))
        if key[-1] == "kernel" and layer in linears and linears[layer].is_quantized:
            var.set_value(linears[layer].weight())
        else:
            var.set_value(current[key].get_value())
    return nnx.from_flat_state(flat)


def _place_outer(flat, source: Source, cfg: ModelConfig, layout: Mapping[str, QuantScheme], entries,
                 dtype) -> None:
    """Reads non-block tensors (embeddings, final norm, lm_head) into ``flat``; a quantized lm_head gets RTN
    (there is no calibrated method for the head)."""
    for name, path, transpose in entries:
        arr = to_model_layout(source.read(name), transpose)
        layer = _dotted(path[:-1])
        if path[-1] == "kernel" and layer in layout:
            _check_shape(arr, (cfg.hidden_size, cfg.vocab_size), name, path)
            _place_quantized(flat, path[:-1], layout[layer].quantize(arr), name)
        else:
            _place(flat, path, arr, name, dtype)


def _float_block(cfg: ModelConfig, index: int, source: Source, entries, dtype) -> Block:
    block = nnx.eval_shape(lambda: Block(cfg, index, {}, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(block)
    flat = dict(nnx.to_flat_state(state))
    if cfg.mlp_act_scale:
        flat[("mlp", "act_scale")].set_value(jnp.ones((cfg.intermediate_size,), dtype))
    for name, path, transpose in entries:
        _place(flat, path[2:], to_model_layout(source.read(name), transpose), name, dtype)
    return merge(graphdef, flat)


def quantize_blockwise(source: Source, cfg: ModelConfig, layout: Mapping[str, QuantScheme], method: str,
                       calib_ids: np.ndarray, opts: CalibrationOptions, *, clip: bool = False, dtype=jnp.float32,
                       progress: bool = True) -> tuple[CausalLM, dict]:
    """Runs ``method`` block by block; returns the quantized model and a report (time per phase, AWQ alphas)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if method == "gptq" and clip:
        raise ValueError("the clipping search applies to rtn and awq; GPTQ sets its scales itself (drop --clip)")
    opts.validate()
    timer = _Timer()
    t_start = time.perf_counter()
    graphdef, flat, _ = abstract_model(cfg, layout, dtype)
    per_block: dict[int, list] = defaultdict(list)
    outer = []  # embeddings, final norm, lm_head
    for name in source.tensor_names:
        path, transpose = model_path_of(source, cfg, name)
        if path is not None:
            (per_block[path[1]] if path[0] == "layers" else outer).append((name, path, transpose))
    embedding = [e for e in outer if e[1][0] in ("embed", "embed_norm")]
    _place_outer(flat, source, cfg, layout, embedding, dtype)
    init_derived(flat, cfg, dtype)
    calib = np.asarray(calib_ids, np.int32)
    n, seqlen = calib.shape
    positions = jnp.broadcast_to(jnp.arange(seqlen, dtype=jnp.int32), (max(opts.batch_size, opts.search_batch_size),
                                                                        seqlen))
    with timer("embed"):
        x_all = np.empty((n, seqlen, cfg.hidden_size), np.float32)
        embedder = nnx.merge(graphdef, nnx.from_flat_state(flat))  # only its embedding layers are filled
        for sl in _minibatches(n, opts.batch_size):
            x_all[sl] = np.asarray(embedder.embed_inputs(jnp.asarray(calib[sl])), np.float32)
        del embedder
        for _, path, _ in embedding:  # read again at the end: not resident next to the activations
            flat[path].set_value(jax.ShapeDtypeStruct(flat[path].get_value().shape, flat[path].get_value().dtype))
    rng = np.random.default_rng(opts.seed)
    report: dict = {"blocks": {}}
    bar = tqdm(range(cfg.num_layers), desc=f"{method} blocks", unit="block", disable=not progress)
    for i in bar:
        with timer("load block"):
            block = _float_block(cfg, i, source, per_block[i], dtype)
            float_graphdef, float_state = nnx.split(block)
        layers = {name[len(f"layers.{i}."):]: s for name, s in layout.items() if name.startswith(f"layers.{i}.")}
        report["blocks"][i] = quantize_block(block, cfg, x_all, positions, layers, method, clip, opts, timer, rng)
        for rel, var in nnx.to_flat_state(nnx.state(block)):
            key = ("layers", i, *rel)
            if key not in flat:
                raise RuntimeError(f"block {i} produced {key}, which the checkpoint layout lacks")
            flat[key].set_value(var.get_value())
        with timer("forward (quantized)"):
            # The quantized block as a float block holding its dequantized kernels: the same numbers as the
            # packed forward, without dequantizing again for every minibatch.
            state = _dequantized_float_state(block, float_state)
            for sl in _minibatches(n, opts.batch_size):
                out = _block_apply(float_graphdef, state, jnp.asarray(x_all[sl]), positions[: sl.stop - sl.start])
                x_all[sl] = np.asarray(out, np.float32)
        del block, float_state, state
        release_freed_memory()
    del x_all
    with timer("load outer"):
        _place_outer(flat, source, cfg, layout, outer, dtype)
    report["seconds"] = {k: round(v, 1) for k, v in timer.seconds.items()}
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    return merge(graphdef, flat), report
