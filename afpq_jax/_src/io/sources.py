"""Float checkpoint sources, read tensor by tensor: HF safetensors (single or sharded), HF Flax msgpack, GGUF.

Every source yields ``(hf_name, np.ndarray)`` in Hugging Face / torch layout, so one key table per family
serves them all. Tensors are read lazily, one at a time, so peak host memory stays near one copy of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.io import gguf as gguf_io
from afpq_jax._src.io.files import read_json_object
from afpq_jax._src.io.safetensors_io import SafetensorsError, SafetensorsFile

TensorIter = Iterator[tuple[str, np.ndarray]]


@dataclasses.dataclass
class Source:
    """An opened float checkpoint: its HF-style config, its tensors (lazy) and where tokenizer files live."""

    path: Path
    kind: str  # "safetensors" | "flax_msgpack" | "gguf"
    config: dict
    tensor_names: list[str]
    _iter: Callable[[], TensorIter]
    _read: Callable[[str], np.ndarray]
    tokenizer_dir: Path | None = None
    _read_slice: Callable[[str, tuple[slice, ...]], np.ndarray] | None = None
    _describe: Callable[[str], tuple[np.dtype, tuple[int, ...]]] | None = None  # (dtype, shape) without reading

    def tensors(self) -> TensorIter:
        """All tensors, in storage order (sequential reads)."""
        return self._iter()

    def read(self, name: str) -> np.ndarray:
        """One tensor by name (random access: block-by-block algorithms load one block at a time)."""
        if name not in self._names:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return self._read(name)

    @property
    def reads_slices(self) -> bool:
        """Whether `read_slice` reads only what the slice needs (safetensors: its bytes; GGUF: its rows); else it
        reads the whole tensor."""
        return self._read_slice is not None

    def describe(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor (from the header where the format has one)."""
        if name not in self._names:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        if self._describe is None:
            arr = self._read(name)
            return arr.dtype, tuple(arr.shape)
        return self._describe(name)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``read(name)[index]``; safetensors read only the slice's bytes and GGUF only its rows (each host reads
        its own shards)."""
        if self._read_slice is None:
            return self.read(name)[index]
        if name not in self._names:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return self._read_slice(name, index)

    @functools.cached_property
    def _names(self) -> set[str]:
        return set(self.tensor_names)


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'; re-download the checkpoint")
        # shards are plain file names next to the index: "../x" or "/x" would read another model's weights
        bad = [f for f in weight_map.values() if not (isinstance(f, str) and Path(f).name == f and f != "..")]
        if bad:
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names in the model's "
                                  f"directory, got {bad[0]!r}; re-download the checkpoint")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s) {missing[:3]}; download all shards")
        return [d / f for f in files]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(d.glob("*.safetensors"))
    return others


def _open_safetensors(f: Path) -> SafetensorsFile:
    try:
        return SafetensorsFile(f)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None


def _safetensors_source(d: Path, config: dict) -> Source:
    handles = [_open_safetensors(f) for f in _safetensors_files(d)]  # validates every header up front
    seen: dict[str, Path] = {}
    for h in handles:  # a tensor in two files: which copy is right? (the last one silently won)
        for k in h.keys():
            if k in seen:
                raise CheckpointError(f"tensor {k!r} is in both {seen[k]} and {h.path}; remove the file that does "
                                      f"not belong to the model")
            seen[k] = h.path

    def tensors() -> TensorIter:
        for h in handles:
            try:
                yield from h.items()
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None

    owner = {k: h for h in handles for k in h.keys()}

    def read(name: str) -> np.ndarray:
        try:
            return owner[name].read(name)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None

    def read_slice(name: str, index: tuple[slice, ...]) -> np.ndarray:
        try:
            return owner[name].read_slice(name, index)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None

    def describe(name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = owner[name].entries[name]
        return dtype, tuple(shape)

    return Source(d, "safetensors", config, [k for h in handles for k in h.keys()], tensors, read, tokenizer_dir=d,
                  _read_slice=read_slice, _describe=describe)


def _flatten_msgpack(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten_msgpack(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), np.asarray(v)


def _flax_hf_name(path: tuple[str, ...], arr: np.ndarray) -> tuple[str, np.ndarray]:
    """transformers-4 Flax names -> torch names: kernel (in, out) -> weight (out, in); embedding/scale -> weight."""
    *mods, leaf = path
    if leaf == "kernel":
        return ".".join(mods + ["weight"]), np.ascontiguousarray(arr.T) if arr.ndim == 2 else arr
    if leaf in ("embedding", "scale"):
        leaf = "weight"
    return ".".join(mods + [leaf]), arr


def _flax_msgpack_source(d: Path, config: dict) -> Source:
    from flax import serialization
    f = d / "flax_model.msgpack"
    try:
        tree = serialization.msgpack_restore(f.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{f} is corrupted or truncated ({e}); re-download it") from None
    if "params" in tree and isinstance(tree["params"], dict) and len(tree) == 1:
        tree = tree["params"]
    flat = [_flax_hf_name(p, a) for p, a in _flatten_msgpack(tree)]
    by_name = dict(flat)
    return Source(d, "flax_msgpack", config, list(by_name), lambda: iter(flat), by_name.__getitem__, tokenizer_dir=d)


def _gguf_source(f: Path) -> Source:
    try:
        config = gguf_io.read_gguf_config(f)
        tensors = gguf_io.GGUFTensors(f)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{f}: {e}") from None
    names = tensors.names()
    return Source(f, "gguf", config, names, lambda: ((n, tensors.read(n)) for n in names), tensors.read,
                  _read_slice=tensors.read_slice, _describe=tensors.describe)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                              "*.jinja", "flax_model.msgpack"]))
    except Exception as e:
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face Hub "
                              f"({type(e).__name__}); without network access pass a local directory "
                              f"(config.json + *.safetensors) or a .gguf file") from None


def local_path(path: str | os.PathLike) -> Path:
    """The local model directory or file for ``path``: itself, or the downloaded snapshot of a Hub id."""
    p = Path(path)
    if p.exists():
        return p
    if isinstance(path, str) and _HUB_ID.match(path) and not path.startswith((".", "/")):
        return _download_from_hub(path)
    raise CheckpointError(f"model path {str(path)!r} does not exist; pass a Hugging Face model directory, "
                          f"a .gguf file or a Hub id like org/name")


def open_source(path: str | os.PathLike) -> Source:
    """Opens a local HF directory, a ``.gguf`` file, or (with network) a Hub id ``org/name``."""
    p = local_path(path)
    if p.is_file():
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if p.suffix == ".gguf" or magic == b"GGUF":
            return _gguf_source(p)
        raise CheckpointError(f"{p} is a file but not a GGUF model; pass a model directory or a .gguf file")
    cfg_path = p / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{p} has no config.json; pass a Hugging Face model directory "
                              f"(config.json + model.safetensors)")
    config = read_json_object(cfg_path)
    if _safetensors_files(p):
        return _safetensors_source(p, config)
    if (p / "flax_model.msgpack").exists():
        return _flax_msgpack_source(p, config)
    raise CheckpointError(f"{p} has config.json but no model.safetensors, sharded safetensors index or "
                          f"flax_model.msgpack (PyTorch .bin files are not read: convert them to safetensors)")
