"""A conversion's finished blocks on disk, so an interrupted conversion continues where it stopped.

After block i is placed, the driver calls `BlockProgress.save`: ``block_000i.npz`` (every leaf of the finished
block, float or packed, with its layers' final schemes), ``activations.npy`` (block i+1's inputs, for calibrated
methods) and last ``progress.json`` (which block is done, the method's report so far, the random generator's state,
and the conversion's fingerprint). Every file is written under a temporary name and renamed, and progress.json is
renamed last, so a process killed at any instant leaves either the previous consistent state or the new one.
`BlockProgress.resume` gives that state back only if the fingerprint (model config, layout, method and options,
calibration windows, dtype) is the same; resuming then yields the checkpoint an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src.errors import CheckpointError
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


@dataclasses.dataclass
class ResumePoint:
    done: int                      # the last finished block
    report: dict
    rng_state: dict
    activations: Path | None  # the .npy of block done+1's inputs (calibrated methods)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


class BlockProgress:
    """The progress directory of one conversion (see the module doc)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint

    def start_over(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
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
        acts = self.directory / ACTIVATIONS
        return ResumePoint(done=int(state["done"]), report=state["report"], rng_state=state["rng"],
                           activations=acts if state.get("activations") else None)

    def save(self, index: int, block: Block, report: dict, rng: np.random.Generator,
             activations) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
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

        _atomic_write(self.directory / f"block_{index:04d}.npz", write_block)
        if activations is not None:
            _atomic_write(self.directory / ACTIVATIONS, write_activations)
        state = {"fingerprint": self.fingerprint, "done": index, "report": report,
                 "rng": rng.bit_generator.state, "activations": activations is not None}
        _atomic_write(self.directory / STATE, lambda p: p.write_text(json.dumps(state)))
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
