"""A conversion's finished blocks on disk, so an interrupted conversion continues where it stopped.

After block i is placed, the driver calls `BlockProgress.save`: ``block_000i.npz`` (every leaf of the finished
block, float or packed, with its layers' final schemes), ``activations.npy`` (block i+1's inputs, for calibrated
methods) and last ``progress.json`` (which block is done, the method's report so far, the random generator's state,
and the conversion's fingerprint). Every file is written under a temporary name and renamed, and progress.json is
renamed last, so a process killed at any instant leaves either the previous consistent state or the new one.
`BlockProgress.resume` gives that state back only if the fingerprint (model config, layout, method and options,
calibration windows, dtype) is the same, and the driver resumes only if the source weights are the same too: a
digest of every finished block's float weights and of the embeddings / head is saved with them
(`weights_digest`) and compared with the model being resumed (another model of the same architecture would
otherwise mix in silently). Resuming then yields the checkpoint an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src.errors import CheckpointError, OutputError
from afpq_jax._src.io import outputs
from afpq_jax._src.models import ModelConfig
from afpq_jax._src.models.transformer import Block, block_linears
from afpq_jax._src.scheme import QuantScheme

STATE = "progress.json"
ACTIVATIONS = "activations.npy"
CRASH_HOOK = "AFPQ_TEST_CRASH_AFTER_BLOCK"  # tests: os._exit right after this block is saved (a kill -9)


def fingerprint(cfg: ModelConfig, layout: Mapping[str, QuantScheme], method_json: dict, calibration_json: Any,
                windows: np.ndarray | None, dtype) -> str:
    """What must be equal for saved blocks to belong to this conversion."""
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": repr(cfg), "layout": {k: str(v) for k, v in sorted(layout.items())},
                         "method": method_json, "calibration": calibration_json, "dtype": jnp.dtype(dtype).name},
                        sort_keys=True, default=str).encode())
    if windows is not None:
        h.update(np.ascontiguousarray(windows).tobytes())
    return h.hexdigest()[:16]


def weights_digest(arrays: Iterable[tuple[str, Any]]) -> str:
    """A digest of named arrays (name, dtype, shape and bytes): the identity of a block's or the outer layers'
    source weights."""
    h = hashlib.sha256()
    for name, value in arrays:
        a = np.ascontiguousarray(np.asarray(value))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))  # no copy of the bytes (embeddings can be GBs)
    return h.hexdigest()[:32]


def block_digest(block: Block) -> str:
    """`weights_digest` of a (float) block's every leaf."""
    return weights_digest(sorted((".".join(map(str, p)), v.get_value())
                                 for p, v in nnx.to_flat_state(nnx.state(block))))


@dataclasses.dataclass
class ResumePoint:
    done: int                      # the last finished block
    report: dict
    rng_state: dict
    activations: Path | None  # the .npy of block done+1's inputs (calibrated methods)
    source_blocks: dict[str, str]  # block index -> `block_digest` of its float source weights
    source_outer: str | None       # `weights_digest` of the embeddings / final norm / head


# What a progress directory holds; `BlockProgress.start_over` removes nothing else.
_OURS = re.compile(r"(progress\.json|activations\.npy|block_\d{4}\.npz|\..*\.tmp)$")


def _owned_entries(directory: Path) -> list[Path]:
    entries = list(directory.iterdir())
    foreign = [p for p in entries if not _OURS.fullmatch(p.name) or p.is_dir()]
    if foreign:
        raise OutputError(f"{directory} holds {foreign[0].name}, which a conversion's progress never does: it is "
                          f"not a progress directory — move it away or choose another --out")
    return entries


def discard_progress(directory: str | os.PathLike) -> None:
    """Removes a progress directory (its conversion's checkpoint is written): only the files progress writes."""
    d = Path(directory)
    if d.is_dir():
        for p in _owned_entries(d):
            p.unlink()
        d.rmdir()


def discard_empty_progress(directory: str | os.PathLike) -> None:
    """Removes a progress directory in which no block was saved yet (a run stopped before its first block)."""
    if not (Path(directory) / STATE).exists():
        discard_progress(directory)


class BlockProgress:
    """The progress directory of one conversion (see the module doc)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.source_blocks: dict[str, str] = {}
        self.source_outer: str | None = None

    def start_over(self) -> None:
        """Empties the directory of an earlier conversion's progress (only files progress writes)."""
        if self.directory.is_dir():
            for p in _owned_entries(self.directory):
                p.unlink()
        self.directory.mkdir(parents=True, exist_ok=True)

    def resume(self) -> ResumePoint | None:
        """The saved state, None if nothing was saved; `CheckpointError` if it is another conversion's."""
        path = self.directory / STATE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.directory} holds the progress of a different conversion (other model, "
                                  f"rules, method, calibration or dtype); run without --resume to start over")
        if "source_outer" not in state:
            raise CheckpointError(f"{self.directory} was saved by an older afpq-jax, without digests of the source "
                                  f"weights, so it cannot be checked against this model; run without --resume to "
                                  f"start over")
        acts = self.directory / ACTIVATIONS
        self.source_blocks = dict(state.get("source_blocks") or {})
        self.source_outer = state.get("source_outer")
        return ResumePoint(done=int(state["done"]), report=state["report"], rng_state=state["rng"],
                           activations=acts if state.get("activations") else None,
                           source_blocks=dict(self.source_blocks), source_outer=self.source_outer)

    def save(self, index: int, block: Block, report: dict, rng: np.random.Generator,
             activations, source_digest: str) -> None:
        """Saves finished block ``index`` (``source_digest``: `block_digest` of its float source weights)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.source_blocks[str(index)] = source_digest
        leaves = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(block))}
        schemes = {name: (lin.scheme.to_json() if lin.scheme is not None else None)
                   for name, lin in block_linears(block).items()}

        def write_block(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, __schemes__=np.asarray(json.dumps(schemes)), **leaves)

        def write_activations(p: Path) -> None:
            if hasattr(activations, "save_npy"):  # spilled to a file: copied, not read into RAM
                activations.save_npy(p)
                return
            with open(p, "wb") as f:
                np.save(f, activations)

        outputs.atomic_write(self.directory / f"block_{index:04d}.npz", write_block,
                             size=sum(v.nbytes for v in leaves.values()))
        if activations is not None:
            outputs.atomic_write(self.directory / ACTIVATIONS, write_activations,
                                 size=int(np.prod(activations.shape)) * 4)
        state = {"fingerprint": self.fingerprint, "done": index, "report": report,
                 "rng": rng.bit_generator.state, "activations": activations is not None,
                 "source_blocks": self.source_blocks, "source_outer": self.source_outer}
        outputs.atomic_write_text(self.directory / STATE, json.dumps(state))
        if os.environ.get(CRASH_HOOK) == str(index):
            os._exit(3)

    def block(self, index: int, cfg: ModelConfig, dtype) -> Block:
        """Finished block ``index`` as it was saved (its layers' final schemes, packed leaves and all)."""
        path = self.directory / f"block_{index:04d}.npz"
        try:
            saved = np.load(path)
        except OSError as e:
            raise CheckpointError(f"{path} is missing or unreadable ({e}); run without --resume to start over") \
                from None
        schemes = {f"layers.{index}.{k}": QuantScheme.from_json(v)
                   for k, v in json.loads(str(saved["__schemes__"])).items() if v is not None}
        block = nnx.eval_shape(lambda: Block(cfg, index, schemes, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(block)
        flat = dict(nnx.to_flat_state(state))
        for p, var in flat.items():
            var.set_value(jnp.asarray(saved[".".join(map(str, p))]))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))
