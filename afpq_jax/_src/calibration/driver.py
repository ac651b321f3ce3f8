"""The block-by-block driver (the AutoGPTQ / llm-compressor pipeline), for every registered method.

Embed the calibration windows, then for each decoder block i: load block i's float weights (nothing else of the
model's blocks is in memory), accumulate the statistics the method asks for over every window, let the method
quantize the block (`Method.quantize_block`), overwrite the activations *in place*, minibatch by minibatch, with
the quantized block's outputs, which are block i+1's inputs (in the same pass, accumulate what the method
`observe`s of the finished block and hand it to `Method.finish_block`), and place the block in the model.
Memory: one float block, one activation buffer (N x L x hidden float32) and the packed blocks done so far. A
method with ``calibrated=False`` (plain RTN) skips the activations: blocks stream straight from the weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from afpq_jax._src.calibration import taps
from afpq_jax._src.calibration.data import Calibration
from afpq_jax._src.calibration.method import BlockContext, Method
from afpq_jax._src.calibration.progress import BlockProgress, block_digest, weights_digest
from afpq_jax._src.calibration.spill import activation_buffer, load_activations
from afpq_jax._src.calibration.timer import PhaseTimer
from afpq_jax._src.errors import CheckpointError, InputError
from afpq_jax._src.loading import FloatWeights, ModelAssembler, dotted
from afpq_jax._src.memory import old_objects_frozen, release_freed_memory
from afpq_jax._src.models import CausalLM, ModelConfig
from afpq_jax._src.models.transformer import Block, block_linears
from afpq_jax._src.scheme import QuantScheme

_EMBEDDING = ("embed", "embed_norm")
logger = logging.getLogger("afpq_jax")


def _check_finite(block: Block, schemes: Mapping[str, QuantScheme], index: int) -> None:
    """A NaN / inf weight in a layer about to be quantized is an error naming the layer (the quantizer's own
    check cannot know the layer's place in the model)."""
    linears = block_linears(block)
    for name in schemes:
        bad = int(jnp.sum(~jnp.isfinite(linears[name].kernel.get_value())))
        if bad:
            raise InputError(f"layers.{index}.{name} has {bad} NaN/inf weights; quantization needs finite weights "
                             f"— fix the checkpoint (or keep the layer float with a rule)")


def _warn_saturated_scales(block: Block, schemes: Mapping[str, QuantScheme], index: int) -> None:
    """One warning per layer whose group scales hit the largest value of their storage dtype (a float16 scale
    saturates at 65504: weights beyond 65504 x the format's largest level come out clipped)."""
    linears = block_linears(block)
    for name in schemes:
        qt = linears[name].quantized_tensor()
        if qt.global_scale is not None:  # E4M3 under a global scale: the largest group is put at 448 by design
            continue
        for leaf in (qt.scale, qt.scale_neg, qt.channel_scale):
            if leaf is None or not jnp.issubdtype(leaf.dtype, jnp.floating):
                continue
            top = float(jnp.finfo(leaf.dtype).max)
            hit = int(jnp.sum(leaf.astype(jnp.float32) >= top))
            if hit:
                logger.warning("layers.%d.%s: %d group scale(s) saturate at %s's largest value %g, so its largest "
                               "weights are clipped; convert with --scale-dtype float32 (scale_dtype='float32')",
                               index, name, hit, jnp.dtype(leaf.dtype).name, top)
                break


def _outer_digest(weights: FloatWeights) -> str:
    return weights_digest((dotted(p), weights.read_outer(p)) for p in sorted(weights.outer_paths()))


def _check_same_source(weights: FloatWeights, store: BlockProgress, done: int, cfg: ModelConfig, dtype) -> None:
    """The model being resumed is the one whose blocks were saved: the embeddings / head and every finished
    block's float weights have the digests saved with them."""
    def differ(what: str) -> CheckpointError:
        return CheckpointError(f"the model's {what} differ from those of the interrupted conversion saved in "
                               f"{store.directory}: it was made from another model; run without --resume to start "
                               f"over")

    if _outer_digest(weights) != store.source_outer:
        raise differ("embeddings / output layers")
    for i in range(done + 1):
        if block_digest(weights.block(i, cfg, dtype)) != store.source_blocks.get(str(i)):
            raise differ(f"weights of block {i}")


def _block_layout(layout: Mapping[str, QuantScheme], index: int) -> dict[str, QuantScheme]:
    prefix = f"layers.{index}."
    return {name[len(prefix):]: s for name, s in layout.items() if name.startswith(prefix)}


def _dequantized_copy(block: Block, cfg: ModelConfig, index: int, dtype) -> Block:
    """A float block with ``block``'s values, each packed kernel replaced by its dequantized weight: the same
    numbers as the packed forward, without dequantizing again for every minibatch."""
    float_block = nnx.eval_shape(lambda: Block(cfg, index, {}, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(float_block)
    flat = dict(nnx.to_flat_state(state))
    current = dict(nnx.to_flat_state(nnx.state(block)))
    linears = block_linears(block)
    for key, var in flat.items():
        layer = ".".join(map(str, key[:-1]))
        if key[-1] == "kernel" and layer in linears and linears[layer].is_quantized:
            var.set_value(linears[layer].weight())
        else:
            var.set_value(current[key].get_value())
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def run(weights: FloatWeights, cfg: ModelConfig, layout: Mapping[str, QuantScheme], method: Method,
        windows: np.ndarray | None, calibration: Calibration | None, *, dtype=jnp.float32,
        progress: bool = True, timer: PhaseTimer | None = None, store: BlockProgress | None = None,
        max_memory: int | None = None, spill_dir: str | None = None) -> tuple[CausalLM, dict, dict[str, float]]:
    """Quantizes the model block by block with ``method``. ``cfg`` is the architecture to build (already
    `Method.prepare_config`-ed). Returns (model, report, seconds per phase); the report holds the method's
    per-block facts (deterministic), the seconds do not belong in a checkpoint. A method with ``packs=False``
    transforms float weights only: the model returned is float. ``store``: each finished block
    is saved there, and a run finds the blocks an interrupted one saved and continues after them.
    ``max_memory`` (bytes): calibration activations larger than half of it live in a file in ``spill_dir``
    (default: the system's temporary directory) instead of RAM (`spill`)."""
    timer = timer if timer is not None else PhaseTimer()
    t_start = time.perf_counter()
    dtype = jnp.dtype(dtype)
    asm = ModelAssembler(cfg, layout if method.packs else {}, dtype)
    x_all = positions = None
    rng = np.random.default_rng(calibration.seed if calibration is not None else 0)
    report: dict = {}
    if method.calibrated:
        if windows is None or calibration is None:
            raise ValueError(f"method {method.name!r} needs calibration windows")
        n, seqlen = windows.shape
        rows = max(calibration.batch_size, calibration.search_batch_size)
        positions = jnp.broadcast_to(jnp.arange(seqlen, dtype=jnp.int32), (rows, seqlen))
    try:
        point = store.resume() if store is not None else None
        start = 0
        if point is not None:
            with timer("resume"):
                _check_same_source(weights, store, point.done, cfg, dtype)
                for i in range(point.done + 1):
                    asm.place_block(i, store.block(i, cfg, dtype))
                report, start = point.report, point.done + 1
                if point.activations is not None:
                    x_all = load_activations(point.activations, max_memory, spill_dir)
                rng.bit_generator.state = point.rng_state
        elif store is not None:
            store.source_outer = _outer_digest(weights)
        if point is None and method.calibrated:
            embedding = [p for p in weights.outer_paths() if p[0] in _EMBEDDING]
            asm.place_outer(weights, embedding)
            with timer("embed"):
                x_all = activation_buffer((n, seqlen, cfg.hidden_size), max_memory, spill_dir)
                embedder = asm.partial_model()  # only its embedding layers are filled
                for sl in taps.minibatches(n, calibration.batch_size):
                    x_all[sl] = np.asarray(embedder.embed_inputs(jnp.asarray(windows[sl])), np.float32)
                del embedder
                asm.release(embedding)  # placed again at the end: not resident next to the activations
        bar = tqdm(range(start, cfg.num_layers), desc=f"{method.name} blocks", unit="block", disable=not progress,
                   initial=start, total=cfg.num_layers)
        with old_objects_frozen():
            model = _blocks(bar, weights, cfg, layout, method, calibration, dtype, timer, store, x_all, positions,
                            rng, report, asm)
    finally:
        if hasattr(x_all, "close"):  # a spill file: removed now, also when the run stops (Ctrl-C, SIGTERM, error)
            x_all.close()
    del x_all
    seconds = timer.rounded()
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    return model, report, seconds


def _blocks(bar, weights: FloatWeights, cfg: ModelConfig, layout: Mapping[str, QuantScheme], method: Method,
            calibration: Calibration | None, dtype, timer: PhaseTimer, store: BlockProgress | None, x_all,
            positions, rng: np.random.Generator, report: dict, asm: ModelAssembler) -> CausalLM:
    """The block loop of `run` (see the module doc); returns the assembled model."""
    for i in bar:
        with timer("load block"):
            block = weights.block(i, cfg, dtype)
        schemes = _block_layout(layout, i)
        _check_finite(block, schemes, i)
        source_digest = block_digest(block) if store is not None else None
        stats, tokens = {}, 0
        if method.calibrated and method.statistics():
            with timer("statistics"):
                stats, tokens = taps.input_statistics(block, method.statistics(), schemes, x_all, positions,
                                                      calibration.batch_size)
        ctx = BlockContext(index=i, block=block, cfg=cfg, schemes=schemes, stats=stats, tokens=tokens,
                           calibration=calibration, timer=timer, rng=rng, inputs=x_all, positions=positions)
        facts = method.quantize_block(ctx) or {}
        linears = block_linears(block)
        if method.packs:
            left = [name for name in schemes if not linears[name].is_quantized]
            if left:
                raise RuntimeError(f"method {method.name!r} left layers.{i}.{left[0]} float; its layout quantizes it")
            _warn_saturated_scales(block, schemes, i)
        observe, observed = method.observe(ctx) if method.calibrated else ((), ())
        if method.calibrated and (i + 1 < cfg.num_layers or observe):
            with timer("forward (quantized)"):  # the next block's inputs, and what the method observes
                seen = taps.forward(_dequantized_copy(block, cfg, i, dtype), x_all, positions,
                                    calibration.batch_size, statistics=observe, layers=observed,
                                    write=i + 1 < cfg.num_layers)
            if observe:
                facts.update(method.finish_block(ctx, seen) or {})
        del ctx, stats
        if facts:
            report[str(i)] = facts
        asm.place_block(i, block)
        if store is not None:
            with timer("save progress"):
                store.save(i, block, report, rng, x_all if method.calibrated and i + 1 < cfg.num_layers else None,
                           source_digest)
        del block, linears
        release_freed_memory()
        timer.block_done(i)
    with timer("load outer"):
        asm.place_outer(weights)
    return asm.finish()
