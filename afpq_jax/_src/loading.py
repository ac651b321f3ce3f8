"""Build NNX models from checkpoint sources, streaming tensor by tensor.

The model is first built abstractly (`nnx.eval_shape`: no memory), then each checkpoint tensor is mapped by
its family's key table, checked against the expected shape and placed. A linear kernel that the quantization
layout names is handed to ``quantize_kernel`` as it arrives, so a float copy of the whole model never exists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from afpq_jax._src.io.sources import CheckpointError, Source
from afpq_jax._src.layers import QuantScheme
from afpq_jax._src.models import CausalLM, ModelConfig, family_for
from afpq_jax._src.models.params import map_key, to_model_layout
from afpq_jax._src.qtensor import QuantizedTensor

Path_ = tuple[Any, ...]
QuantizeKernel = Callable[[str, np.ndarray], QuantizedTensor]


def abstract_model(cfg: ModelConfig, quant: Mapping[str, QuantScheme] | None = None, dtype=jnp.float32):
    """(graphdef, flat abstract state {path: Variable}, {linear path: kernel shape}); nothing is allocated."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, quant=quant, dtype=dtype, rngs=nnx.Rngs(0)))
    shapes = {p: (m.in_features, m.out_features) for p, m in model.linear_layers().items()}
    graphdef, state = nnx.split(model)
    return graphdef, dict(nnx.to_flat_state(state)), shapes


def merge(graphdef, flat: dict[Path_, Any]) -> CausalLM:
    missing = [p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        shown = ", ".join(".".join(map(str, p)) for p in missing[:4])
        raise CheckpointError(f"checkpoint is missing {len(missing)} parameter(s) ({shown}{', ...' if len(missing) > 4 else ''}); "
                              f"it is incomplete or of a different architecture")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def init_derived(flat, cfg: ModelConfig, dtype) -> None:
    """Parameters no float checkpoint has: AWQ's GELU act scales start at 1 (identity)."""
    if cfg.mlp_act_scale:
        for i in range(cfg.num_layers):
            flat[("layers", i, "mlp", "act_scale")].set_value(jnp.ones((cfg.intermediate_size,), dtype))


def model_path_of(source: Source, cfg: ModelConfig, name: str) -> tuple[Path_ | None, bool]:
    """(model path, transpose) of a checkpoint tensor via its family's key table; (None, _) = not a parameter."""
    try:
        return map_key(family_for(source.config).KEY_RULES, name, cfg.tie_embeddings)
    except KeyError:
        raise CheckpointError(f"unexpected tensor {name!r} in {source.path} for model_type {cfg.model_type!r}; "
                              f"the checkpoint does not match its config.json") from None


def _dotted(path: Path_) -> str:
    return ".".join(map(str, path))


def populate_from_source(source: Source, cfg: ModelConfig, *, dtype=jnp.float32,
                         quant: Mapping[str, QuantScheme] | None = None,
                         quantize_kernel: QuantizeKernel | None = None, progress: bool = False) -> CausalLM:
    """Fills a model from a float checkpoint. Linear layers named in ``quant`` get their kernel replaced by
    ``quantize_kernel(layer_path, kernel)`` (required when ``quant`` is non-empty)."""
    quant = dict(quant or {})
    if quant and quantize_kernel is None:
        raise ValueError("a quantization layout needs a quantize_kernel function")
    graphdef, flat, kernel_shapes = abstract_model(cfg, quant, dtype)
    seen: set[str] = set()
    bar = tqdm(source.tensors(), total=len(source.tensor_names), desc="loading", unit="tensor",
               disable=not progress, leave=False)
    for name, arr in bar:
        path, transpose = model_path_of(source, cfg, name)
        if path is None:
            continue
        if name in seen:
            raise CheckpointError(f"tensor {name!r} appears twice in {source.path}")
        seen.add(name)
        arr = to_model_layout(np.asarray(arr), transpose)
        layer = _dotted(path[:-1])
        if path[-1] == "kernel" and layer in quant:
            _check_shape(arr, kernel_shapes[layer], name, path)
            _place_quantized(flat, path[:-1], quantize_kernel(layer, arr), name)
            continue
        if path not in flat:
            raise CheckpointError(f"tensor {name!r} maps to {_dotted(path)}, which this model does not have; "
                                  f"check config.json (e.g. attention_bias / tie_word_embeddings)")
        _place(flat, path, arr, name, dtype)
    init_derived(flat, cfg, dtype)
    return merge(graphdef, flat)


def _check_shape(arr: np.ndarray, want, name: str, path) -> None:
    if tuple(arr.shape) != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)} but the model expects {tuple(want)} "
                              f"for {_dotted(path)}; config.json does not match the weights")


def _place(flat, path, arr: np.ndarray, name: str, dtype) -> None:
    var = flat[path]
    _check_shape(arr, var.get_value().shape, name, path)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
        raise CheckpointError(f"tensor {name!r} has non-float dtype {arr.dtype}")
    var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))


def _place_quantized(flat, layer_path, qt: QuantizedTensor, name: str) -> None:
    for leaf_name in ("codes", "scale", "scale_neg", "zero"):
        leaf = getattr(qt, leaf_name)
        key = (*layer_path, leaf_name)
        if leaf is None:
            continue
        if key not in flat or tuple(flat[key].get_value().shape) != tuple(leaf.shape):
            raise CheckpointError(f"quantized {name!r} does not fit layer {_dotted(layer_path)}")
        flat[key].set_value(leaf)
