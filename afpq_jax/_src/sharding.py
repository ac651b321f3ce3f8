"""Where arrays live on a device mesh: the one sharding policy of loading, calibration and training.

`check_mesh` accepts a mesh for all three. Loading (`partition_spec`, `model_shardings`, `shard_model`): every
parameter of a built-in model, tensor parallel over ``'model'``, FSDP over ``'data'`` (both optional axes).
Calibration (`data_parallel`, `device_batch`, `device_minibatches`, `column_sharded`, `to_host`): minibatches
split over ``'data'``, column-independent solves over every device. Training (`fsdp_sharding`, `place_fsdp`,
`place_batch`): parameters and optimizer state FSDP over ``'data'``, each batch split over it.

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

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from afpq_jax._src.errors import InputError
from afpq_jax._src.scheme import QuantScheme

MODEL, DATA = "model", "data"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")
_N_LEAVES = ("kernel", "codes", "scale", "scale_neg", "zero")  # 2-D leaves whose last axis is N


def check_mesh(mesh: Mesh, *, need: str | None = None) -> Mesh:
    """The mesh with every axis in Auto mode (XLA propagates the shardings through the model's ops; Explicit
    axes would need every op annotated); a one-line error for axis names this module does not know, or when the
    axis ``need`` (training's ``'data'``) is missing."""
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; e.g. "
                         f"jax.make_mesh((1, 4), ('data', 'model'))")
    unknown = [a for a in mesh.axis_names if a not in (MODEL, DATA)]
    if unknown:
        raise InputError(f"mesh axes {unknown} are not known; name them 'model' (tensor parallel) and/or 'data' "
                         f"(FSDP), e.g. jax.make_mesh((1, 4), ('data', 'model'))")
    if need is not None and need not in mesh.axis_names:
        raise InputError(f"this mesh needs a {need!r} axis, got axes {mesh.axis_names}")
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


# ---- calibration: minibatches data parallel, column-independent solves over every device --------------------

_DATA_MESH: contextvars.ContextVar = contextvars.ContextVar("afpq_data_mesh", default=None)


@contextlib.contextmanager
def data_parallel(mesh: Mesh) -> Iterator[None]:
    """Within it, calibration minibatches are split over the mesh's ``'data'`` axis (when their size divides):
    the jitted passes then run data parallel and XLA sums statistics such as XTX across devices."""
    token = _DATA_MESH.set(mesh)
    try:
        yield
    finally:
        _DATA_MESH.reset(token)


def column_sharded(w: jax.Array) -> jax.Array:
    """A kernel (K, N) split by output columns over every device of the `data_parallel` mesh (when N divides):
    column-independent solves such as GPTQ's then run SPMD, each device on its columns."""
    mesh = _DATA_MESH.get()
    if mesh is None or mesh.devices.size == 1 or w.shape[-1] % mesh.devices.size:
        return w
    spec = PartitionSpec(*([None] * (w.ndim - 1)), tuple(mesh.axis_names))
    return jax.device_put(w, NamedSharding(mesh, spec))


def to_host(a: jax.Array) -> np.ndarray:
    """``a``'s whole value on this host; an array split across processes is gathered from all of them (every
    process must call this for the same array)."""
    if getattr(a, "is_fully_addressable", True):
        return np.asarray(a)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def _split_over_data(x: np.ndarray, axis: int) -> jax.Array:
    """``x`` on the devices, its ``axis`` split over ``'data'`` inside `data_parallel` (when the size divides)."""
    mesh = _DATA_MESH.get()
    if mesh is None or DATA not in mesh.axis_names or np.shape(x)[axis] % mesh.shape[DATA]:
        return jnp.asarray(x)
    spec = [None] * np.ndim(x)
    spec[axis] = DATA
    return jax.device_put(np.asarray(x), NamedSharding(mesh, PartitionSpec(*spec)))


def device_batch(x: np.ndarray) -> jax.Array:
    """A minibatch (B, ...) on the devices: split over ``'data'`` inside `data_parallel`, else as is."""
    return _split_over_data(x, 0)


def device_minibatches(xs: np.ndarray) -> jax.Array:
    """Minibatches (M, B, ...) on the devices, each minibatch's B sequences split over ``'data'`` inside
    `data_parallel` (AWQ's scale search: every candidate's loss then sums over all devices' tokens)."""
    return _split_over_data(xs, 1)


# ---- training: FSDP over 'data' -------------------------------------------------------------------------------

def fsdp_sharding(mesh: Mesh, x) -> NamedSharding:
    """The first axis of ``x`` that the mesh's ``data`` axis divides is sharded over it; else replicated."""
    n = mesh.shape[DATA]
    shape = getattr(x, "shape", ())
    for axis, size in enumerate(shape):
        if size % n == 0 and size >= n:
            return NamedSharding(mesh, PartitionSpec(*([None] * axis), DATA))
    return NamedSharding(mesh, PartitionSpec())


def place_fsdp(tree, mesh: Mesh | None):
    """Every leaf of ``tree`` placed by `fsdp_sharding` (as is without a mesh)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.device_put(x, fsdp_sharding(mesh, x)), tree)


def place_batch(ids: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """Token ids (accum, batch, L) on the devices, the batch axis split over ``'data'``."""
    if mesh is None:
        return jnp.asarray(ids)
    if ids.shape[1] % mesh.shape[DATA]:
        raise InputError(f"batch_size {ids.shape[1]} must be a multiple of the mesh's data axis "
                         f"({mesh.shape[DATA]} devices)")
    return jax.device_put(ids, NamedSharding(mesh, PartitionSpec(None, DATA)))
