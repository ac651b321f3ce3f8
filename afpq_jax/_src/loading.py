"""Build NNX models block by block from float weights, placing float or quantized tensors.

Two sources of float weights implement one small interface (`FloatWeights`): an opened checkpoint
(`CheckpointWeights`: each tensor mapped by its family's key table and read on demand) and an in-memory float
model (`ModelWeights`). `ModelAssembler` holds the abstract state of the model being built (`nnx.eval_shape`:
nothing allocated) and fills it: ``place_block(i, block)`` copies a finished block (float or quantized), and
``place_outer`` the embeddings, final norm and lm_head. Every conversion, streaming RTN and the calibrated
driver alike, loads one float block (`FloatWeights.block`), turns it into its final form and places it, so a
float copy of the whole model never exists.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.io.sources import Source, open_source
from afpq_jax._src.models import CausalLM, ModelConfig, config_from_hf, family_for
from afpq_jax._src.models.params import map_key, to_model_layout
from afpq_jax._src.models.transformer import Block, block_linears
from afpq_jax._src.qtensor import LEAF_NAMES, QuantizedTensor
from afpq_jax._src.scheme import QuantScheme
from afpq_jax._src.sharding import model_shardings

ModelPath = tuple[Any, ...]  # ("layers", 3, "attn", "q_proj", "kernel")


def dotted(path: ModelPath) -> str:
    return ".".join(map(str, path))


class FloatWeights(Protocol):
    """Float weights to build a model from, block by block."""

    def block(self, index: int, cfg: ModelConfig, dtype, shardings: Mapping[ModelPath, Any] | None = None) -> Block:
        """Decoder block ``index`` as a float `Block` of architecture ``cfg`` (parameters ``cfg`` adds that the
        weights lack, such as AWQ's GELU act scale, start at identity). ``shardings`` ({path in the block:
        sharding}): those parameters are built as sharded arrays, each shard read on its own where the source
        allows it."""

    def outer_paths(self) -> list[ModelPath]:
        """Model paths of the parameters outside the blocks (embeddings, final norm, lm_head)."""

    def read_outer(self, path: ModelPath) -> np.ndarray:
        """One of `outer_paths` in model layout."""

    def read_outer_sharded(self, path: ModelPath, want: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        """One of `outer_paths` as a float array of ``want``'s shape and dtype with ``sharding``, each shard read
        on its own where the source allows it."""


def _abstract_block(cfg: ModelConfig, index: int, dtype) -> tuple[Any, dict]:
    block = nnx.eval_shape(lambda: Block(cfg, index, {}, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(block)
    flat = dict(nnx.to_flat_state(state))
    if cfg.mlp_act_scale:
        flat[("mlp", "act_scale")].set_value(jnp.ones((cfg.intermediate_size,), dtype))
    return graphdef, flat


def _merge(graphdef, flat: dict, what: str):
    missing = [p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        shown = ", ".join(dotted(p) for p in missing[:4])
        raise CheckpointError(f"{what} is missing {len(missing)} parameter(s) ({shown}"
                              f"{', ...' if len(missing) > 4 else ''}); it is incomplete or of a different "
                              f"architecture")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_shape(arr, want, name: str, path: ModelPath) -> None:
    _check_dims(tuple(arr.shape), want, name, path)


def _check_dims(shape: tuple[int, ...], want, name: str, path: ModelPath) -> None:
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(shape)} but the model expects {tuple(want)} "
                              f"for {dotted(path)}; config.json does not match the weights")


def model_path(rules, name: str, cfg: ModelConfig, source: Source) -> tuple[ModelPath | None, bool]:
    """`map_key` for tensor ``name`` of ``source``; a tensor no rule covers is a one-line `CheckpointError`."""
    try:
        return map_key(rules, name, cfg.tie_embeddings)
    except KeyError:
        raise CheckpointError(f"unexpected tensor {name!r} in {source.path} for model_type {cfg.model_type!r}; "
                              f"the checkpoint does not match its config.json") from None


def check_float(dtype, name: str) -> None:
    if not np.issubdtype(dtype, np.floating) and np.dtype(dtype).name != "bfloat16":
        raise CheckpointError(f"tensor {name!r} has non-float dtype {np.dtype(dtype)}")


def _set_float(var, arr, name: str, path: ModelPath) -> None:
    _check_shape(arr, var.get_value().shape, name, path)
    check_float(arr.dtype, name)
    var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))


def _place_whole(arr, want: jax.ShapeDtypeStruct, sharding, name: str, path: ModelPath) -> jax.Array:
    """A whole float tensor, checked against ``want``, placed with ``sharding``."""
    _check_shape(arr, want.shape, name, path)
    check_float(arr.dtype, name)
    return jax.device_put(np.asarray(arr, want.dtype), sharding)


class CheckpointWeights:
    """Float weights of an opened checkpoint, read tensor by tensor on demand (random access)."""

    def __init__(self, source: Source, cfg: ModelConfig):
        self.source, self.cfg = source, cfg
        if source.config.get("quantization_config") is not None:
            method = source.config["quantization_config"]
            method = method.get("quant_method") if isinstance(method, dict) else method
            raise CheckpointError(f"{source.path} is already quantized ({method}); afpq_jax.load reads it with its "
                                  f"packed layers as they are (aq.save(aq.load(PATH), OUT) stores it as an afpq-jax "
                                  f"checkpoint) — to quantize again, start from the float model")
        rules = family_for(source.config).KEY_RULES
        self._blocks: dict[int, list[tuple[str, ModelPath, bool]]] = defaultdict(list)
        self._outer: dict[ModelPath, tuple[str, bool]] = {}
        seen: set[str] = set()
        for name in source.tensor_names:
            path, transpose = model_path(rules, name, cfg, source)
            if path is None:
                continue
            if name in seen:
                raise CheckpointError(f"tensor {name!r} appears twice in {source.path}")
            seen.add(name)
            if path[0] == "layers":
                if not 0 <= path[1] < cfg.num_layers:
                    raise CheckpointError(f"tensor {name!r} belongs to block {path[1]} but config.json has "
                                          f"{cfg.num_layers} layers")
                self._blocks[path[1]].append((name, path[2:], transpose))
            else:
                self._outer[path] = (name, transpose)

    def block(self, index: int, cfg: ModelConfig, dtype, shardings: Mapping[ModelPath, Any] | None = None) -> Block:
        graphdef, flat = _abstract_block(cfg, index, dtype)
        for name, rel, transpose in self._blocks.get(index, []):
            if rel not in flat:
                raise CheckpointError(f"tensor {name!r} maps to layers.{index}.{dotted(rel)}, which this model "
                                      f"does not have; check config.json (e.g. attention_bias)")
            sharding = (shardings or {}).get(rel)
            if sharding is not None:
                flat[rel].set_value(self.read_sharded(name, transpose, flat[rel].get_value(), sharding,
                                                      ("layers", index, *rel)))
            else:
                _set_float(flat[rel], to_model_layout(self.source.read(name), transpose), name,
                           ("layers", index, *rel))
        return _merge(graphdef, flat, f"block {index} of {self.source.path}")

    def read_sharded(self, name: str, transpose: bool, want: jax.ShapeDtypeStruct, sharding,
                     path: ModelPath) -> jax.Array:
        """Tensor ``name`` in model layout as an array with ``sharding``. Where the source reads slices
        (safetensors, GGUF) each addressable shard is read on its own (`Source.read_slice`: a host reads only its
        shards); other formats read the tensor once and place it."""
        if not self.source.reads_slices:
            return _place_whole(to_model_layout(self.source.read(name), transpose), want, sharding, name, path)
        dtype, shape = self.source.describe(name)
        _check_dims(shape[::-1] if transpose else shape, want.shape, name, path)
        check_float(dtype, name)

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            src = tuple(reversed(index)) if transpose else index
            return np.asarray(to_model_layout(self.source.read_slice(name, src), transpose), dtype=want.dtype)

        return jax.make_array_from_callback(tuple(want.shape), sharding, shard)

    def outer_paths(self) -> list[ModelPath]:
        return list(self._outer)

    def read_outer(self, path: ModelPath) -> np.ndarray:
        name, transpose = self._outer[path]
        return to_model_layout(self.source.read(name), transpose)

    def read_outer_sharded(self, path: ModelPath, want: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        name, transpose = self._outer[path]
        return self.read_sharded(name, transpose, want, sharding, path)

    def tensor_name(self, path: ModelPath) -> str:
        return self._outer[path][0]


def checkpoint_weights(path: str | os.PathLike) -> CheckpointWeights:
    """Float weights of a model path (HF directory, GGUF, Hub id), read block by block; ``.cfg`` is its config."""
    source = open_source(path)
    return CheckpointWeights(source, config_from_hf(source.config))


class ModelWeights:
    """Float weights of an in-memory model (its quantized layers, if any, are rejected)."""

    def __init__(self, model: CausalLM):
        quantized = [p for p, m in model.linear_layers().items() if m.is_quantized]
        if quantized:
            raise CheckpointError(f"the model already has quantized layers ({quantized[0]}, ...); start from a "
                                  f"float model")
        self.model, self.cfg = model, model.cfg
        self._state = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def block(self, index: int, cfg: ModelConfig, dtype, shardings: Mapping[ModelPath, Any] | None = None) -> Block:
        graphdef, flat = _abstract_block(cfg, index, dtype)  # in memory already: placed whole, then sharded
        for rel, var in flat.items():
            key = ("layers", index, *rel)
            if key in self._state:
                _set_float(var, np.asarray(self._state[key]), dotted(key), key)
        return _merge(graphdef, flat, f"block {index} of the model")

    def outer_paths(self) -> list[ModelPath]:
        return [p for p in self._state if p[0] != "layers"]

    def read_outer(self, path: ModelPath) -> np.ndarray:
        return np.asarray(self._state[path])

    def read_outer_sharded(self, path: ModelPath, want: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        # in memory already: placed whole, then sharded
        return _place_whole(self.read_outer(path), want, sharding, dotted(path), path)


def abstract_model(cfg: ModelConfig, quant: Mapping[str, QuantScheme] | None = None, dtype=jnp.float32):
    """(graphdef, flat abstract state {path: Variable}); nothing is allocated."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, quant=quant, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, dict(nnx.to_flat_state(state))


class ModelAssembler:
    """The model being built: abstract until each parameter is placed; `finish` checks nothing is missing."""

    def __init__(self, cfg: ModelConfig, layout: Mapping[str, QuantScheme], dtype, mesh=None):
        """``mesh``: every placed array goes straight to its shards (`sharding.model_shardings`)."""
        self.cfg, self.layout, self.dtype = cfg, dict(layout), jnp.dtype(dtype)
        self._graphdef, self._flat = abstract_model(cfg, self.layout, self.dtype)
        self._layout_changed = False
        self.shardings = model_shardings(self.partial_model(), mesh) if mesh is not None else {}

    def block_shardings(self, index: int) -> dict[ModelPath, Any]:
        """{path inside block ``index``: its sharding} (empty without a mesh)."""
        return {key[2:]: s for key, s in self.shardings.items() if key[:2] == ("layers", index)}

    def _put(self, path: ModelPath, value):
        sharding = self.shardings.get(path)
        return value if sharding is None else jax.device_put(value, sharding)

    def place_block(self, index: int, block: Block) -> None:
        """Copies a finished block's state (float parameters and packed weights) into the model.

        A layer's activation quantization is decided during calibration, so the block's schemes may differ from
        the layout in their ``act_*`` fields (and then carry an ``input_scale``): the layout follows the block.
        """
        for rel, layer in block_linears(block).items():
            path = f"layers.{index}.{rel}"
            want = self.layout.get(path)
            if layer.scheme != want and want is not None and layer.scheme is not None and \
                    layer.scheme.with_activations(None, None) == want.with_activations(None, None):
                self.layout[path] = layer.scheme
                self._layout_changed = True
        for rel, var in nnx.to_flat_state(nnx.state(block)):
            key = ("layers", index, *rel)
            if key[-1] == "input_scale" and key not in self._flat:
                self._flat[key] = type(var)(jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype))
            if key not in self._flat:
                raise RuntimeError(f"block {index} holds {dotted(key)}, which the model's layout lacks "
                                   f"(a layer the layout quantizes was left float, or the reverse)")
            want = self._flat[key].get_value()
            if tuple(want.shape) != tuple(var.get_value().shape) or want.dtype != var.get_value().dtype:
                raise RuntimeError(f"block {index}: {dotted(key)} is {var.get_value().dtype}"
                                   f"{tuple(var.get_value().shape)}, the model expects {want.dtype}{tuple(want.shape)}")
            self._flat[key].set_value(self._put(key, var.get_value()))

    def place_outer(self, weights: FloatWeights, paths: list[ModelPath] | None = None,
                    quantize: Callable[[QuantScheme, np.ndarray], QuantizedTensor] | None = None) -> None:
        """Reads parameters outside the blocks (all, or ``paths``); a kernel the layout quantizes (lm_head) goes
        through ``quantize`` (default: the scheme's RTN)."""
        for path in paths if paths is not None else weights.outer_paths():
            layer = dotted(path[:-1])
            if path[-1] == "kernel" and layer in self.layout:  # quantized whole (RTN needs every group)
                arr = weights.read_outer(path)
                scheme = self.layout[layer]
                _check_shape(arr, (self.cfg.hidden_size, self.cfg.vocab_size), layer, path)
                check_float(arr.dtype, layer)
                arr = np.asarray(arr, self.dtype)  # quantized from the model's dtype, as the blocks' kernels are
                qt = (quantize or (lambda s, a: s.quantize(a)))(scheme, arr)
                self._place_quantized(path[:-1], qt)
            elif path not in self._flat:
                raise CheckpointError(f"parameter {dotted(path)} is not part of this model; check config.json "
                                      f"(e.g. tie_word_embeddings)")
            elif path in self.shardings:  # each shard read on its own (the embedding: vocab x hidden)
                want = self._flat[path].get_value()
                self._flat[path].set_value(weights.read_outer_sharded(
                    path, jax.ShapeDtypeStruct(want.shape, want.dtype), self.shardings[path]))
            else:
                _set_float(self._flat[path], weights.read_outer(path), dotted(path), path)

    def release(self, paths: list[ModelPath]) -> None:
        """Forgets placed parameters (to be placed again later: keeps them out of memory meanwhile)."""
        for path in paths:
            v = self._flat[path].get_value()
            self._flat[path].set_value(jax.ShapeDtypeStruct(v.shape, v.dtype))

    def _place_quantized(self, layer_path: ModelPath, qt: QuantizedTensor) -> None:
        for leaf_name in LEAF_NAMES:
            leaf = getattr(qt, leaf_name)
            key = (*layer_path, leaf_name)
            if leaf is None:
                continue
            if key not in self._flat or tuple(self._flat[key].get_value().shape) != tuple(leaf.shape):
                raise RuntimeError(f"quantized weight does not fit layer {dotted(layer_path)}")
            self._flat[key].set_value(self._put(key, leaf))

    def abstract_state(self) -> dict[ModelPath, jax.ShapeDtypeStruct]:
        """Every parameter of the model: its path, shape and dtype."""
        out = {}
        for p, v in self._flat.items():
            val = v.get_value()
            out[p] = jax.ShapeDtypeStruct(val.shape, val.dtype)
        return out

    def place(self, path: ModelPath, value) -> None:
        """Places one array as it is (a restored checkpoint leaf: float parameter or packed leaf)."""
        if path not in self._flat:
            raise CheckpointError(f"the checkpoint has {dotted(path)}, which this model does not have; check "
                                  f"config.json (e.g. attention_bias, tie_word_embeddings)")
        want = self._flat[path].get_value()
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            raise CheckpointError(f"{dotted(path)} is {value.dtype}{tuple(value.shape)} in the checkpoint, the model "
                                  f"expects {want.dtype}{tuple(want.shape)}")
        self._flat[path].set_value(self._put(path, value))

    def partial_model(self) -> CausalLM:
        """The model with whatever is placed so far (for embedding calibration inputs before any block)."""
        return nnx.merge(self._graphdef, nnx.from_flat_state(self._flat))

    def finish(self) -> CausalLM:
        if self._layout_changed:  # the model's structure follows the schemes the blocks ended with
            self._graphdef, abstract = abstract_model(self.cfg, self.layout, self.dtype)
            if set(abstract) != set(self._flat):
                raise RuntimeError(f"placed state does not match the final layout: "
                                   f"{sorted(map(dotted, set(abstract) ^ set(self._flat)))[:4]}")
            self._flat = {p: self._flat[p] for p in abstract}
            self._layout_changed = False
        return _merge(self._graphdef, self._flat, "the checkpoint")


def load_float(weights: FloatWeights, cfg: ModelConfig, *, dtype=jnp.float32, progress: bool = False,
               mesh=None) -> CausalLM:
    """A float model from ``weights``, block by block (each array on its shards of ``mesh``, if given)."""
    asm = ModelAssembler(cfg, {}, dtype, mesh)
    for i in tqdm(range(cfg.num_layers), desc="loading", unit="block", disable=not progress, leave=False):
        asm.place_block(i, weights.block(i, cfg, dtype, shardings=asm.block_shardings(i)))
    asm.place_outer(weights)
    return asm.finish()
