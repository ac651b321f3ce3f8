"""Where each parameter of a built-in model lives on a device mesh: tensor parallel over ``'model'``, FSDP over
``'data'`` (both optional axes of the mesh).

Megatron's split of a decoder block: column-parallel layers (q/k/v/qkv, gate/up, lm_head) are split along
their output features N, row-parallel layers (o_proj, down_proj) along their input features K, so a block
needs one reduction after each row-parallel matmul (XLA's SPMD partitioner inserts it). Packed weights follow
their float kernel: codes ``(rows, N)``, group scales / zeros ``(G, N)`` and channel scales ``(N,)`` split
along N with it; along K only where every shard holds whole groups and whole packed rows
(``K % (shards * group_size) == 0`` and the rows divide evenly), otherwise that layer's leaves are replicated.
The embedding is split over the vocabulary. ``'data'`` (FSDP) splits the other axis of every 2-D leaf. An axis
is split only when its size divides evenly; everything else is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from afpq_jax._src.errors import InputError
from afpq_jax._src.scheme import QuantScheme

MODEL, DATA = "model", "data"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")
_N_LEAVES = ("kernel", "codes", "scale", "scale_neg", "zero")  # 2-D leaves whose last axis is N


def check_mesh(mesh: Mesh) -> Mesh:
    """The mesh with every axis in Auto mode (XLA propagates the shardings through the model's ops; Explicit
    axes would need every op annotated); a one-line error for axis names this module does not know."""
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; e.g. "
                         f"jax.make_mesh((1, 4), ('data', 'model'))")
    unknown = [a for a in mesh.axis_names if a not in (MODEL, DATA)]
    if unknown:
        raise InputError(f"mesh axes {unknown} are not known; name them 'model' (tensor parallel) and/or 'data' "
                         f"(FSDP), e.g. jax.make_mesh((1, 4), ('data', 'model'))")
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _split(size: int, mesh: Mesh, name: str) -> str | None:
    n = mesh.shape[name] if name in mesh.axis_names else 1
    return name if n > 1 and size % n == 0 else None


def partition_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh, scheme: QuantScheme | None = None,
                   in_features: int | None = None) -> PartitionSpec:
    """The `PartitionSpec` of the leaf at ``path`` (e.g. ``('layers', 0, 'attn', 'q_proj', 'codes')``) of
    ``shape``; ``scheme`` and ``in_features`` (K) are its layer's, for packed leaves."""
    leaf = path[-1]
    layer = path[-2] if len(path) >= 2 else ""
    spec: list[str | None] = [None] * len(shape)
    if len(shape) == 2 and layer in COLUMN_PARALLEL and leaf in _N_LEAVES:
        spec[1] = _split(shape[1], mesh, MODEL)
    elif len(shape) == 1 and layer in COLUMN_PARALLEL and leaf in ("bias", "channel_scale"):
        spec[0] = _split(shape[0], mesh, MODEL)
    elif len(shape) == 2 and layer in ROW_PARALLEL and leaf in _N_LEAVES:
        n = mesh.shape[MODEL] if MODEL in mesh.axis_names else 1
        whole_groups = leaf == "kernel" or (
            scheme is not None and scheme.group_size is not None and in_features is not None
            and in_features % (n * scheme.group_size) == 0)
        if whole_groups:
            spec[0] = _split(shape[0], mesh, MODEL)
    elif len(shape) == 2 and path[0] == "embed" and leaf == "weight":
        spec[0] = _split(shape[0], mesh, MODEL)
    if len(shape) == 2:  # FSDP over 'data': the axis tensor parallelism left whole
        free = 1 if spec[0] is not None else 0
        if spec[free] is None:
            spec[free] = _split(shape[free], mesh, DATA)
    return PartitionSpec(*spec)


def model_shardings(model: Any, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """``{state path: NamedSharding}`` for every leaf of a built-in model (abstract or not)."""
    mesh = check_mesh(mesh)
    layers = {tuple(int(p) if p.isdigit() else p for p in path.split(".")): layer
              for path, layer in model.linear_layers().items()}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        layer = layers.get(tuple(path[:-1]))
        scheme = layer.scheme if layer is not None else None
        k = layer.in_features if layer is not None else None
        out[tuple(path)] = NamedSharding(mesh, partition_spec(tuple(path), tuple(var.get_value().shape), mesh,
                                                              scheme, k))
    return out


def shard_model(model: Any, mesh: Mesh) -> Any:
    """``model`` with every parameter placed on ``mesh`` (in place; returned for chaining)."""
    shardings = model_shardings(model, mesh)
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jax.device_put(var.get_value(), shardings[tuple(path)]))
    nnx.update(model, state)
    return model
