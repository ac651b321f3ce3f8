"""Packed checkpoints: an orbax tree of the model state plus config.json, tokenizer files and
quantization_config.json. Written into a temporary sibling directory and renamed into place, so an
interrupted or failed conversion never leaves a half checkpoint at the destination.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src.errors import CheckpointError, InputError, OutputExistsError
from afpq_jax._src.loading import ModelAssembler
from afpq_jax._src.models import CausalLM, config_from_hf
from afpq_jax._src.scheme import QuantScheme

QUANT_CONFIG = "quantization_config.json"
PARAMS_DIR = "params"
CHECKPOINT_FORMAT = "afpq-jax/1"  # bump when the packed layout or the state tree changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """Where a model came from and how it was quantized: what `afpq_jax.save` writes besides the weights.

    Held by `CausalLM.checkpoint_info` (static, hashable). ``hf_config`` is the source's config.json and
    ``quantization`` the method / rules / calibration / report record, both as JSON text; ``phase_seconds`` is the
    conversion's time per phase (reported, never written: checkpoints are deterministic).
    """

    hf_config: str | None = None
    tokenizer_dir: str | None = None
    gguf_path: str | None = None  # a GGUF source's tokenizer is exported from the GGUF file itself
    source: str | None = None
    source_kind: str | None = None
    quantization: str | None = None
    phase_seconds: tuple[tuple[str, float], ...] = ()


# The keys of quantization_config.json that `CheckpointInfo.quantization` carries (the rest is derived at save).
RECORD_KEYS = ("method", "method_options", "clip", "activations", "calibration", "rules", "report", "source",
               "source_kind")


def output_exists(out: Path) -> OutputExistsError:
    return OutputExistsError(f"output directory {out} already exists; choose another --out or pass --overwrite")


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def _nested(flat: Mapping[tuple, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = value
    return out


def _leaf(nested: dict, path: tuple):
    node = nested
    for p in path:
        node = node[str(p)]
    return node


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a fresh temporary directory next to ``out``; on success it replaces ``out``, on any failure
    (including Ctrl-C / SIGTERM) it is deleted and ``out`` is left as it was.

    Multi-process (``jax.process_count() > 1``, a shared file system): every process gets the same directory
    (process 0's name, broadcast); process 0 creates, renames and deletes it, the others wait at barriers.
    """
    out = out.absolute()
    if out.exists() and not overwrite:
        raise output_exists(out)
    multi, lead = jax.process_count() > 1, jax.process_index() == 0
    token = uuid.uuid4().int & 0xFFFFFFFF
    if multi:
        from jax.experimental import multihost_utils
        token = int(multihost_utils.broadcast_one_to_all(np.uint32(token)))
    tmp = out.parent / f".{out.name}.partial-{token:08x}"
    if lead:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier("afpq_jax staging directory created")

    def on_term(signum, frame):  # turn SIGTERM into an exception so the cleanup below runs
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if _in_main_thread() else None
    try:
        yield tmp
        _barrier("afpq_jax checkpoint written")
        if lead and out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:  # --overwrite of a plain file (or a link): rmtree would fail silently and leave it behind
                old.unlink(missing_ok=True)
        elif lead:
            tmp.rename(out)
        _barrier("afpq_jax checkpoint renamed")
    finally:
        if lead and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _barrier(name: str) -> None:
    """Waits for every process (multi-process runs only)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def save(model: CausalLM, directory: Path, *, hf_config: dict, quant_config: dict,
         tokenizer_dir: Path | None = None) -> None:
    """Writes a checkpoint into ``directory`` (which must exist and be empty: use `staging_dir`). Multi-process:
    every process calls it; orbax writes each process's shards, process 0 the JSON and tokenizer files."""
    import orbax.checkpoint as ocp

    _, state = nnx.split(model)
    tree = _nested({p: v.get_value() for p, v in nnx.to_flat_state(state)})
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory / PARAMS_DIR, tree)  # every process writes its own shards (orbax multi-host save)
    ckpt.wait_until_finished()
    if jax.process_index() != 0:
        return
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    (directory / QUANT_CONFIG).write_text(json.dumps(quant_config, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and not (directory / name).exists():
                shutil.copy2(src, directory / name)


def quant_layout(quant_config: dict, where: Path | None = None) -> dict[str, QuantScheme]:
    """{layer path: scheme} of a checkpoint; a scheme this version cannot run is a `CheckpointError`."""
    layout = {}
    for path, scheme in quant_config["layers"].items():
        try:
            layout[path] = QuantScheme.from_json(scheme)
        except InputError as e:
            raise CheckpointError(f"{where or 'checkpoint'}: layer {path}: {e} (upgrade afpq-jax or convert "
                                  f"again)") from None
    return layout


def read_quant_config(path: Path) -> dict:
    try:
        qc = json.loads((path / QUANT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / QUANT_CONFIG} is not valid JSON ({e.msg}); the checkpoint is damaged") from None
    if qc.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint_format {qc.get('checkpoint_format')!r}; this afpq-jax reads "
                              f"{CHECKPOINT_FORMAT!r} — convert the model again")
    return qc


def load(path: str | os.PathLike, mesh=None) -> CausalLM:
    """Restores a converted checkpoint into a ready model (packed weights stay packed); with a ``mesh``, every
    leaf is restored straight into its shard (`afpq_jax._src.sharding`): no host holds the whole model."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    qc = read_quant_config(path)
    hf = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf)
    if qc.get("mlp_act_scale"):
        cfg = dataclasses.replace(cfg, mlp_act_scale=True)
    layout = quant_layout(qc, path)
    asm = ModelAssembler(cfg, layout, jnp.dtype(qc.get("dtype", "float32")), mesh)
    # an explicit target sharding everywhere: a checkpoint saved by several processes restores into one
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = _nested({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=asm.shardings.get(p, one_device))
                      for p, v in asm.abstract_state().items()})
    params = path / PARAMS_DIR
    if not params.is_dir():
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ directory; the checkpoint is incomplete")
    try:
        restored = ocp.StandardCheckpointer().restore(params, target)
    except Exception as e:
        raise CheckpointError(f"cannot restore {params} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"the checkpoint is damaged or from another model — convert again") from None
    for p in asm.abstract_state():
        asm.place(p, _leaf(restored, p))
    model = asm.finish()
    record = {k: v for k, v in qc.items() if k in RECORD_KEYS}
    model.checkpoint_info = CheckpointInfo(hf_config=json.dumps(hf, sort_keys=True), tokenizer_dir=str(path),
                                           source=qc.get("source"), source_kind=qc.get("source_kind"),
                                           quantization=json.dumps(record, sort_keys=True))
    return model
