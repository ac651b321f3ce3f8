"""Activation-order groups (GPTQ ``desc_act``): a ``g_idx`` that assigns input rows to groups out of order.

Our packed weights keep a group's rows together, so such a layer is stored with its input rows permuted:
stored row ``j`` is input row ``perm[j]`` (``perm`` = the stable sort of ``g_idx``), its groups contiguous, and
the layer gathers its input by ``perm`` (`QuantScheme.act_order_groups`, `QuantDense.input_perm`). Exact: every
weight keeps its code and its group's scale and zero point. A ``g_idx`` whose groups are not the sizes contiguous
groups have (``group_size`` rows each, the last one shorter) has no such form and is refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from afpq_jax._src import packing
from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.qtensor import QuantizedTensor


def permutation(g_idx: np.ndarray, group_size: int, where: str) -> np.ndarray | None:
    """None for the static grouping ``i // group_size``; else ``perm`` (int32) with ``g_idx[perm]`` sorted."""
    g_idx = np.asarray(g_idx)
    k = g_idx.shape[0]
    static = np.arange(k) // group_size
    if np.array_equal(g_idx, static):
        return None
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    if not np.array_equal(g_idx[perm], static):
        raise CheckpointError(f"{where}: g_idx does not put {group_size} input rows in each group; contiguous "
                              f"groups cannot hold it — the checkpoint is damaged or uses another grouping")
    return perm


def g_idx(perm: np.ndarray, group_size: int) -> np.ndarray:
    """The ``g_idx`` of a layer stored in ``perm`` order: input row ``perm[j]`` is in group ``j // group_size``."""
    out = np.empty(len(perm), np.int32)
    out[np.asarray(perm)] = np.arange(len(perm)) // group_size
    return out


def permute_rows(qt: QuantizedTensor, perm: np.ndarray) -> QuantizedTensor:
    """``qt`` with its code rows taken in ``perm`` order (stored row ``j`` = row ``perm[j]`` of ``qt``); scales
    and zero points stay with their groups."""
    bits = qt.format.bits
    codes = np.asarray(packing.unpack(qt.codes, bits, qt.in_features))[np.asarray(perm)]
    return dataclasses.replace(qt, codes=packing.pack(codes, bits))


def input_order_codes(qt: QuantizedTensor, perm: np.ndarray | None) -> np.ndarray:
    """The ``(in, out)`` codes of a layer in its input's order (undoing ``perm``, when there is one)."""
    codes = np.asarray(packing.unpack(qt.codes, qt.format.bits, qt.in_features))
    return codes if perm is None else codes[np.argsort(perm)]
