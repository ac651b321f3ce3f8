"""safetensors files: a minimal reader that reads each tensor with plain file reads (no mmap), and the writer of
sharded checkpoints (`ShardedWriter`: Hugging Face's shard names and ``model.safetensors.index.json``).

Why not `safetensors.safe_open`: it memory-maps the file, and every page touched while streaming stays in the
process's resident set until the file is closed, so streaming a model cost ~1 extra copy of it in RSS. Reading
tensor by tensor into fresh buffers keeps peak memory near one copy of the weights. The format is simple: an
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 2**20
DTYPE_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}  # numpy dtype -> the header's dtype string
INDEX = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Header of one .safetensors file, validated on open as the official reader does: every entry's dtype, shape
    and offsets, and the tensors' byte ranges, sorted, tile the data exactly (no overlap, no gap, no trailing
    bytes), so no tensor can silently read another's bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{self.path} is truncated (no header); re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{self.path} has an invalid header length; the file is corrupted or truncated")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SafetensorsError(f"{self.path} has a corrupted header; re-download it") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: the header is not a JSON object; the file is corrupted or not "
                                   f"safetensors (re-download it)")
        self.metadata = header.pop("__metadata__", None)
        if self.metadata is not None and not (isinstance(self.metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items())):
            raise SafetensorsError(f"{self.path}: __metadata__ must map strings to strings, got "
                                   f"{_short(self.metadata)}; the file is corrupted (re-download it)")
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {
            name: self._entry(name, info) for name, info in header.items()}
        self._check_layout(size - self.data_start)

    def _entry(self, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, each checked by type and range."""
        bad = f"{self.path}: tensor {name!r} has"
        if not isinstance(info, dict):
            raise SafetensorsError(f"{self.path}: header entry {name!r} is not an object; the file is corrupted")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise SafetensorsError(f"{bad} dtype {_short(dtype)}; it must be a string such as 'F32' (the file is "
                                   f"corrupted)")
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{bad} unsupported dtype {dtype!r}; supported: {', '.join(_DTYPES)} (convert "
                                   f"the weights to one of them)")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise SafetensorsError(f"{bad} shape {_short(shape)}; it must be a list of integers >= 0 (the file "
                                   f"is corrupted)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)
                and offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{bad} data_offsets {_short(offsets)}; they must be two integers "
                                   f"0 <= begin <= end (the file is corrupted)")
        dt, (begin, end) = np.dtype(_DTYPES[dtype]), offsets
        if end - begin != math.prod(shape) * dt.itemsize:
            raise SafetensorsError(f"{self.path}: tensor {name!r} byte range does not match its shape; "
                                   f"the file is corrupted")
        return dt, tuple(shape), begin, end

    def _check_layout(self, data_size: int) -> None:
        """The byte ranges, sorted, tile [0, data_size) exactly (the official reader's rule): an overlap would give
        a tensor another's bytes, a gap or trailing bytes mean the header and the data disagree."""
        spans = sorted((b, e, k) for k, (_, _, b, e) in self.entries.items())
        for (_, prev_end, prev), (begin, end, name) in zip(spans, spans[1:]):  # overlaps first: they say the most
            if begin < prev_end:
                raise SafetensorsError(f"{self.path}: tensor {name!r} overlaps tensor {prev!r} (bytes {begin} to "
                                       f"{min(end, prev_end)}); the file is corrupted (re-download it)")
        pos = 0
        for begin, end, name in spans:
            if begin > pos:
                raise SafetensorsError(f"{self.path}: {begin - pos} bytes before tensor {name!r} belong to no "
                                       f"tensor; the header and the data disagree (re-download the file)")
            pos = end
        if pos > data_size:
            raise SafetensorsError(f"{self.path} is truncated ({self.data_start + data_size} bytes, header needs "
                                   f"{self.data_start + pos}); re-download it")
        if pos < data_size:
            raise SafetensorsError(f"{self.path} has {data_size - pos} bytes after its last tensor; the header and "
                                   f"the data disagree (re-download the file)")

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, f=None) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        out = np.empty(shape, dtype)
        own = f is None
        f = f or open(self.path, "rb")
        try:
            f.seek(self.data_start + begin)
            view = memoryview(out.reshape(-1).view(np.uint8))
            if f.readinto(view) != end - begin:
                raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated; re-download the file")
        finally:
            if own:
                f.close()
        return out

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``read(name)[index]`` reading only the pages the slice touches (a memory map of the tensor)."""
        dtype, shape, begin, _ = self.entries[name]
        if not shape or 0 in shape:
            return self.read(name)[index]
        view = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=tuple(shape))
        try:
            return np.array(view[index])
        finally:
            del view

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Tensors in file order (sequential reads)."""
        order = sorted(self.entries, key=lambda k: self.entries[k][2])
        with open(self.path, "rb") as f:
            for name in order:
                yield name, self.read(name, f)


def _is_count(x) -> bool:
    """An integer >= 0 from JSON (not a bool, not 2.0 or "2")."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(value) -> str:
    """``repr(value)``, cut to one short line for an error message."""
    r = repr(value)
    return r if len(r) <= 60 else f"{r[:57]}..."


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (name -> C-order array of a dtype in `DTYPE_CODES`) as one safetensors file, in the
    given order; the header is padded with spaces to a multiple of 8 bytes, as the reference writer does."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors code")
        header[name] = {"dtype": DTYPE_CODES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


class ShardedWriter:
    """Writes a checkpoint's tensors into ``directory`` as shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own), tensor by tensor so only one shard is held: ``model.safetensors`` when one shard
    suffices, else ``model-0000i-of-0000n.safetensors`` and `INDEX` (``metadata.total_size``, ``weight_map``).
    `finish` names the shards (the count is known only then) and writes the index."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 5 * 10**9,
                 metadata: Mapping[str, str] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory, self.max_shard_bytes, self.metadata = Path(directory), max_shard_bytes, metadata
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, array: np.ndarray) -> None:
        """Queues tensor ``name`` for the current shard (written out when the next one would overflow it)."""
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        array = np.ascontiguousarray(array)
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.total_size += array.nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        write_file(path, self._pending, self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Names the shards and writes the index; returns the shard file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, tensors), name in zip(self._shards, names):
            path.rename(self.directory / name)
            weight_map.update({t: name for t in tensors})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
