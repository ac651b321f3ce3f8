"""Measured tilings: a table of `BlockConfig` fields per (device kind, implementation, shape).

`benchmarks/autotune.py` times candidate tilings on a device and records the fastest one here;
dispatch (`api`) lays a matching entry over the implementation's defaults, under any field the caller set, and
drops it if the kernel declines it. With no entry, the hand-set defaults of `base` apply.

The table is JSON: ``{key: {field: value}}``. A key names the device kind (``jax.Device.device_kind``), the
implementation, the format and scheme, the group, x's dtype, M rounded up to a power of two, K and N
(`shape_key`). It is read from ``$AFPQ_TUNED_CONFIGS`` when set (a user's own measurements), else from the
packaged ``tuned_configs.json`` next to this file (absent until a device session records one).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax

from afpq_jax._src.errors import InputError
from afpq_jax._src.io.outputs import atomic_write_text
from afpq_jax._src.kernels.quantized_matmul.base import BlockConfig, Problem

PACKAGED_TABLE = Path(__file__).with_name("tuned_configs.json")
_FIELDS = {f.name for f in dataclasses.fields(BlockConfig)}


def table_path() -> Path:
    """The table dispatch reads: ``$AFPQ_TUNED_CONFIGS``, else the packaged file."""
    return Path(os.environ.get("AFPQ_TUNED_CONFIGS") or PACKAGED_TABLE)


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: decode (1), small batches, prefill sizes share entries."""
    return 1 << max(0, (max(m, 1) - 1).bit_length())


def shape_key(impl: str, prob: Problem, device_kind: str) -> str:
    group = "ch" if prob.per_channel else prob.group
    scheme = "asym" if prob.asym else "sym"
    return (f"{device_kind}|{impl}|{prob.format_name}-{scheme}-g{group}|{prob.x_dtype}|m{m_bucket(prob.m)}"
            f"|k{prob.k}|n{prob.n}")


def _device_kind() -> str:
    return jax.devices()[0].device_kind


@functools.cache
def _read(path: str, mtime: float) -> dict[str, dict]:
    del mtime  # part of the cache key: a rewritten table is read again
    try:
        table = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"tuned config table {path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) and set(v) <= _FIELDS for v in table.values()):
        raise InputError(f"tuned config table {path} must map keys to BlockConfig fields {sorted(_FIELDS)}")
    return table


def load(path: Path | None = None) -> dict[str, dict]:
    """The table at ``path`` (default `table_path`), {} when there is none."""
    path = Path(path or table_path())
    if not path.exists():
        return {}
    return _read(str(path), path.stat().st_mtime)


def tuned(impl: str, prob: Problem, device_kind: str | None = None) -> BlockConfig | None:
    """The measured tiling for this shape on this device, or None."""
    entry = load().get(shape_key(impl, prob, device_kind or _device_kind()))
    return None if entry is None else BlockConfig(**entry)


def record(entries: dict[str, BlockConfig], path: Path | None = None) -> Path:
    """Merges ``entries`` (key -> config; unset fields are left out) into the table at ``path`` (default
    `table_path`), written under a temporary name and renamed."""
    path = Path(path or table_path())
    table = dict(load(path))
    for key, cfg in entries.items():
        table[key] = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    atomic_write_text(path, json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    return path
