"""The GGUF container: header, metadata and tensor directory, read straight from the file.

GGUF (llama.cpp's file format, versions 2 and 3, little-endian): ``b"GGUF"``, uint32 version, uint64 tensor count,
uint64 metadata count; then the metadata (key string, uint32 value type, value; arrays carry their element type
and a uint64 length; strings are a uint64 byte length and UTF-8 bytes); then one record per tensor (name, uint32
dimension count, uint64 dimensions in ggml order — fastest-varying first —, uint32 ggml type, uint64 offset);
then the tensor data, starting at the next multiple of ``general.alignment`` (default 32), each offset relative
to that start.

Why not ``gguf.GGUFReader``: it builds a numpy view per metadata item, and a tokenizer's vocabulary is tens of
thousands of strings (SmolLM2: 49k tokens and 48k merges took 15 s of a 24 s load; Gemma 3 has 262k tokens).
Here strings are decoded from one ``bytes`` read of the header, and tensor data stays a memory map. The
dequantizers stay ``gguf.quants``'s; `GGUFTensorInfo.data` has the array ``gguf.quants.dequantize`` takes.

Invariants: every tensor's bytes aligned and inside the file (checked as `read_gguf` maps each one), tensor
names unique (`GGUFFile.validate`).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from afpq_jax._src.errors import InputError, InputNotFoundError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_FIRST_READ = 1 << 24  # bytes; a header longer than this (a huge vocabulary) is read again, 4x larger

# Metadata value types (GGUF spec `gguf_metadata_value_type`): struct format of the scalar ones.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {"B": np.uint8, "b": np.int8, "H": np.uint16, "h": np.int16, "I": np.uint32, "i": np.int32,
          "f": np.float32, "?": np.bool_, "Q": np.uint64, "q": np.int64, "d": np.float64}
# Plain (non-block) ggml tensor types and their numpy element type; every other type is read as bytes.
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the directory. ``shape``: ggml order (fastest-varying first, so a [out, in] matrix is
    ``(in, out)``); ``data``: a read-only memory map of its bytes, shaped as ``gguf.quants.dequantize`` takes it
    (numpy order; for block types the last axis is bytes)."""
    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int       # absolute, in the file
    n_bytes: int
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: ``metadata`` decoded to Python (str / int / float / bool / list), ``tensors`` in file
    order. Float32 values are the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]

    def validate(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InputError(f"{self.path} lists tensor {dup!r} twice; the GGUF file is corrupt")


class _HeaderEndsEarly(InputError):
    """The bytes read so far end inside the header: read more (or the file is truncated)."""


class _Cursor:
    def __init__(self, buf: bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def advance(self, n: int) -> int:
        """Moves past ``n`` bytes; returns where they start (`_HeaderEndsEarly` if the buffer ends first)."""
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise _HeaderEndsEarly(f"{self.path}: the GGUF header ends early (truncated file?); fetch it again")
        return start

    def take(self, fmt: str) -> Any:
        return struct.unpack_from("<" + fmt, self.buf, self.advance(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.take("Q")
        start = self.advance(n)
        return self.buf[start:start + n].decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            v = self.take(_SCALARS[vtype])
            return float(str(np.float32(v))) if vtype == 6 else v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.take("I"), self.take("Q")
            if etype == _STRING:
                return [self.string() for _ in range(n)]
            if etype == _ARRAY:
                raise InputError(f"{self.path}: nested GGUF arrays are not supported (key {key})")
            if etype not in _SCALARS:
                raise InputError(f"{self.path}: unknown GGUF array element type {etype} (key {key})")
            dt = np.dtype(_NUMPY[_SCALARS[etype]]).newbyteorder("<")
            arr = np.frombuffer(self.buf, dt, n, self.advance(n * dt.itemsize))
            if etype == 6:
                return [float(str(v)) for v in arr]
            return arr.tolist()
        raise InputError(f"{self.path}: unknown GGUF metadata value type {vtype} (key {key}); the file is "
                         "corrupt or from a newer GGUF version")


def _header_bytes(path: Path, need: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(need)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parses ``path``'s header and maps its tensor data; a one-line `InputError` for anything that is not a
    readable GGUF v2/v3 file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"GGUF file not found: {p}; pass the path of an existing .gguf model file")
    size = p.stat().st_size
    # The header is read whole: it is a few MB even with a 262k-token vocabulary; grow until it parses.
    need = min(size, _FIRST_READ)
    while True:
        buf = _header_bytes(p, need)
        try:
            parsed = _parse(buf, p)
            break
        except _HeaderEndsEarly:
            if need >= size:
                raise
            need = min(size, need * 4)
    version, metadata, records, header_end = parsed
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment % 8:
        raise InputError(f"{p}: general.alignment {alignment} is not a positive multiple of 8; the file is corrupt")
    data_start = -(-header_end // alignment) * alignment
    # a plain ndarray over the map: numpy.memmap slices cost a Python hook each (dequantizers slice a lot)
    mm = np.memmap(p, np.uint8, mode="r").view(np.ndarray) if size > 0 else np.zeros(0, np.uint8)
    tensors = []
    for name, dims, raw_type, rel in records:
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise InputError(f"{p}: tensor {name!r} has unknown ggml type {raw_type}; upgrade the gguf package or "
                             "re-export the model") from None
        block, type_size = GGML_QUANT_SIZES[ttype]
        n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if n_elems % block:
            raise InputError(f"{p}: tensor {name!r} has {n_elems} elements, not whole {ttype.name} blocks of {block}")
        n_bytes = n_elems // block * type_size
        start = data_start + rel
        if rel % alignment or start + n_bytes > size:
            raise InputError(f"{p}: tensor {name!r} lies outside the file's data section (truncated or corrupt "
                             "file?); fetch it again")
        raw = mm[start:start + n_bytes]
        np_dims = tuple(reversed(dims))
        if raw_type in _PLAIN:
            data = raw.view(np.dtype(_PLAIN[raw_type]).newbyteorder("<")).reshape(np_dims)
        else:
            data = raw.reshape(*np_dims[:-1], np_dims[-1] // block * type_size)
        tensors.append(GGUFTensorInfo(name, tuple(dims), ttype, start, n_bytes, data))
    out = GGUFFile(p, version, metadata, tensors)
    out.validate()
    return out


def _parse(buf: bytes, path: Path) -> tuple[int, dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    if buf[:4] != MAGIC:
        raise InputError(f"{path} is not a readable GGUF file (magic {buf[:4]!r}, expected {MAGIC!r}); pass a "
                         "llama.cpp .gguf model file")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise InputError(f"{path}: GGUF version {version}{hint} is not supported (2 and 3 are); re-export the model "
                         "with a current llama.cpp")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"), key)
    records = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > 8:
            raise InputError(f"{path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        dims = tuple(cur.take("Q") for _ in range(n_dims))
        records.append((name, dims, cur.take("I"), cur.take("Q")))
    return version, metadata, records, cur.pos
