"""Calibration activations that do not fit the memory budget: an ``.npy`` file read and written by minibatch.

The driver and the taps only slice the activations along their first axis (``x[a:b]`` to read a minibatch,
``x[a:b] = y`` to write the block's outputs back, ``x[:n]`` for the search sequences), so a file with explicit
reads and writes serves them: the data sit in the kernel's page cache, which the kernel may evict, not in the
process's resident memory (a memory map would count its touched pages as resident). Reads return ordinary
arrays; only the rows asked for are in RAM at any time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from afpq_jax._src.io import outputs


class SpilledArray:
    """A float32 array (S, ...) in an ``.npy`` file, sliced along axis 0 only (see the module doc)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        self.offset = header.offset
        del header
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(np.float32)
        self._row = int(np.prod(shape[1:])) * 4
        self._file = open(path, "r+b")  # noqa: SIM115 - closed by close() / the finalizer
        self._finalizer = weakref.finalize(self, _remove, self._file, self.path.parent)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _rows(self, key) -> tuple[int, int]:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"spilled activations are sliced along axis 0 only, got {key!r}")
        start, stop, _ = key.indices(self.shape[0])
        return start, max(start, stop)

    def __getitem__(self, key) -> np.ndarray:
        start, stop = self._rows(key)
        out = np.empty((stop - start, *self.shape[1:]), np.float32)
        if stop == start:  # memoryview cannot cast an empty buffer
            return out
        self._file.seek(self.offset + start * self._row)
        self._file.readinto(memoryview(out).cast("B"))
        return out

    def __setitem__(self, key, value) -> None:
        start, stop = self._rows(key)
        value = np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.float32), (stop - start, *self.shape[1:])))
        if stop == start:
            return
        self._file.seek(self.offset + start * self._row)
        self._file.write(memoryview(value).cast("B"))

    def save_npy(self, path: str | os.PathLike) -> None:
        """Writes the whole array as an ``.npy`` file (a file copy: no RAM)."""
        self._file.flush()
        shutil.copyfile(self.path, path)

    def close(self) -> None:
        self._finalizer()


def _remove(file, directory: Path) -> None:
    file.close()
    shutil.rmtree(directory, ignore_errors=True)


def _in_ram(shape: tuple[int, ...], max_memory: int | None) -> bool:
    return max_memory is None or 4 * int(np.prod(shape)) <= max_memory // 2


def _spilled(shape: tuple[int, ...], spill_dir: str | None) -> SpilledArray:
    directory = spill_dir or tempfile.gettempdir()
    outputs.require_space(directory, 4 * int(np.prod(shape)) + 2**20)  # a full disk now, not hours later
    return SpilledArray(Path(tempfile.mkdtemp(prefix="afpq-activations-", dir=directory)) / "x.npy", shape)


def activation_buffer(shape: tuple[int, ...], max_memory: int | None,
                      spill_dir: str | None) -> np.ndarray | SpilledArray:
    """Calibration activations (S, L, D) float32: in RAM, or spilled to a file in ``spill_dir`` when they exceed
    half of ``max_memory`` bytes (the other half is left to one float block, the packed blocks and XLA's
    temporaries)."""
    return np.empty(shape, np.float32) if _in_ram(shape, max_memory) else _spilled(shape, spill_dir)


def load_activations(source: str | os.PathLike, max_memory: int | None,
                     spill_dir: str | None) -> np.ndarray | SpilledArray:
    """`activation_buffer` filled from an ``.npy`` file (a resumed conversion's), never whole in RAM if spilled."""
    src = np.load(source, mmap_mode="r")
    if _in_ram(src.shape, max_memory):
        return np.array(src)
    spilled = _spilled(src.shape, spill_dir)
    step = max(1, len(src) // 16)
    for a in range(0, len(src), step):
        spilled[a:a + step] = src[a:a + step]
    return spilled
