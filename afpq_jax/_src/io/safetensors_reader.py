"""A minimal safetensors reader that reads each tensor with plain file reads (no mmap).

Why not `safetensors.safe_open`: it memory-maps the file, and every page touched while streaming stays in the
process's resident set until the file is closed, so streaming a model cost ~1 extra copy of it in RSS. Reading
tensor by tensor into fresh buffers keeps peak memory near one copy of the weights. The format is simple: an
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Header of one .safetensors file, validated against the file size on open."""

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
        self.metadata = header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for name, info in header.items():
            try:
                dtype = np.dtype(_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: header entry {name!r} is malformed or has an unsupported "
                                       f"dtype {info.get('dtype') if isinstance(info, dict) else info!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
                raise SafetensorsError(f"{self.path}: tensor {name!r} byte range does not match its shape; "
                                       f"the file is corrupted")
            self.entries[name] = (dtype, shape, begin, end)
            end_max = max(end_max, end)
        if self.data_start + end_max > size:
            raise SafetensorsError(f"{self.path} is truncated ({size} bytes, header needs "
                                   f"{self.data_start + end_max}); re-download it")

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
