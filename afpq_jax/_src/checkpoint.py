"""Models in and out: `load` (a converted checkpoint, or a float HF / GGUF model), `save` (the packed checkpoint),
and the provenance a model carries between them (`CheckpointInfo`).

Packed checkpoints: an orbax tree of the model state plus config.json, tokenizer files and
quantization_config.json. Written into a temporary sibling directory and renamed into place (`outputs`), so an
interrupted or failed conversion never leaves a half checkpoint at the destination; read back only after the
arrays' recorded schemes, shapes and dtypes match the JSON (`load`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src import interrupts, validation
from afpq_jax._src.errors import ArgumentTypeError, CheckpointError, InputError, NoSpaceError
from afpq_jax._src.interop import hf_import
from afpq_jax._src.io import files, outputs, sources
from afpq_jax._src.loading import CheckpointWeights, ModelAssembler, load_float
from afpq_jax._src.models import CausalLM, ModelConfig, config_from_hf
from afpq_jax._src.scheme import QuantScheme

logger = logging.getLogger("afpq_jax")

QUANT_CONFIG = outputs.MANIFEST
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

    @classmethod
    def from_source(cls, source: sources.Source) -> CheckpointInfo:
        """The provenance of a float model read from ``source`` (nothing quantized yet)."""
        return cls(hf_config=json.dumps(source.config, sort_keys=True),
                   tokenizer_dir=None if source.tokenizer_dir is None else str(source.tokenizer_dir),
                   gguf_path=str(source.path) if source.kind == "gguf" else None,
                   source=str(source.path), source_kind=source.kind)

    @property
    def tokenizer_path(self) -> str | None:
        """Where the model's tokenizer is: its GGUF file, or the directory with its tokenizer files."""
        return self.gguf_path or self.tokenizer_dir

    def quantized(self, record: Mapping[str, Any], *, source: str | None = None, source_kind: str | None = None,
                  phase_seconds: Iterable[tuple[str, float]] = ()) -> CheckpointInfo:
        """This model's provenance after quantizing it: ``record`` (method, rules, calibration, report: the
        `RECORD_KEYS` a conversion or QAT run knows) plus where it came from (``source`` overrides the path,
        e.g. with the Hub id the user gave)."""
        source = self.source if source is None else source
        source_kind = self.source_kind if source_kind is None else source_kind
        full = {**record, "source": source, "source_kind": source_kind}
        return dataclasses.replace(self, source=source, source_kind=source_kind,
                                   quantization=json.dumps(full, sort_keys=True), phase_seconds=tuple(phase_seconds))


IN_MEMORY = CheckpointInfo(source="<in-memory model>", source_kind="model")  # a model built in code


# The keys of quantization_config.json that `CheckpointInfo.quantization` carries (the rest is derived at save).
RECORD_KEYS = ("method", "imported_from", "method_options", "clip", "activations", "calibration", "rules", "report", "source",
               "source_kind")


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
def staging_dir(out: Path, overwrite: bool, *, inputs: Iterable[str | os.PathLike | None] = (),
                hint: str = "overwrite=True") -> Iterator[Path]:
    """Yields a fresh temporary directory next to ``out``; on success it is published as ``out``
    (`outputs.publish`: an existing ``out`` is replaced only with ``overwrite`` and only if afpq-jax wrote it), on
    any failure (Ctrl-C and SIGTERM included) it is deleted and ``out`` is left as it was. The whole time ``out``
    is claimed (`outputs.claim`: separate from ``inputs``, locked against other runs).

    Multi-process (``jax.process_count() > 1``, a shared file system): every process gets the same directory
    (process 0's name, broadcast); process 0 claims, creates, renames and deletes it, the others wait at barriers.
    """
    out = out.absolute()
    multi, lead = jax.process_count() > 1, jax.process_index() == 0
    with outputs.claim(out, inputs=inputs, overwrite=overwrite, hint=hint, lead=lead) as claim, \
            interrupts.stop_on_signals():
        token = uuid.uuid4().int & 0xFFFFFFFF
        if multi:
            from jax.experimental import multihost_utils
            token = int(multihost_utils.broadcast_one_to_all(np.uint32(token)))
        tmp = out.parent / f".{out.name}.partial-{token:08x}"
        try:  # from before the directory exists: a signal may land between any two lines
            if lead:
                tmp.mkdir()
            _barrier("afpq_jax staging directory created")
            try:
                yield tmp
            except NoSpaceError as e:  # named by the output the user gave, not by the staging directory
                raise outputs.no_space(out, getattr(e, "needed", None)) from None
            _barrier("afpq_jax checkpoint written")
            if lead:
                with interrupts.deferred():
                    outputs.publish(tmp, out, overwrite=claim.overwrite, what=claim.what, hint=claim.hint)
                    claim.published = True
            _barrier("afpq_jax checkpoint renamed")
            claim.published = True
        finally:
            if lead:
                with interrupts.deferred():
                    outputs.remove_tree(tmp)


def _barrier(name: str) -> None:
    """Waits for every process (multi-process runs only)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def write(model: CausalLM, directory: Path, *, hf_config: dict, quant_config: dict) -> None:
    """Writes a checkpoint into ``directory`` (which must exist and be empty: use `staging_dir`). Multi-process:
    every process calls it; orbax writes each process's shards, process 0 the JSON and tokenizer files.

    Each layer's scheme and the checkpoint's dtype also go into orbax's own metadata, beside the arrays, so `load`
    can tell an edited quantization_config.json from the one the arrays were written for. A full disk (checked
    before writing, and if orbax fails with it) is a `NoSpaceError`; a signal waits until orbax's writer is done
    (`interrupts.deferred`), so the caller's cleanup removes everything it wrote."""
    _, state = nnx.split(model)
    tree = _nested({p: v.get_value() for p, v in nnx.to_flat_state(state)})
    # every process writes its own shards (orbax multi-host save)
    write_arrays(directory / PARAMS_DIR, tree,
                 custom_metadata={"layers": quant_config["layers"], "dtype": quant_config["dtype"]})
    if jax.process_index() != 0:
        return
    try:
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        (directory / QUANT_CONFIG).write_text(json.dumps(quant_config, indent=2, sort_keys=True))
        write_tokenizer(model.checkpoint_info, directory)
    except OSError as e:
        full = outputs.as_no_space(e, directory)
        if full is not None:
            raise full from None
        raise


def write_tokenizer(info: CheckpointInfo | None, directory: Path) -> None:
    """The model's tokenizer and generation files into ``directory`` (process 0 only): exported from its GGUF
    file, or copied (`TOKENIZER_FILES`) from the directory it was loaded from."""
    if info is None or jax.process_index() != 0:
        return
    if info.gguf_path:
        from afpq_jax._src.io import gguf as gguf_io
        gguf_io.write_hf_tokenizer(Path(info.gguf_path), directory)
    if info.tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(info.tokenizer_dir) / name
            if src.is_file() and not (directory / name).exists():
                shutil.copy2(src, directory / name)


def write_arrays(directory: Path, tree, custom_metadata: dict | None = None) -> None:
    """Writes a tree of arrays with orbax into ``directory`` (inside a staging directory). A full disk, checked
    before writing and recognised in orbax's errors, is a `NoSpaceError`; a signal waits until orbax's writer
    has finished (`interrupts.deferred`): cut short, its background threads recreate the directory the cleanup
    deletes and print pages of tracebacks."""
    import orbax.checkpoint as ocp

    nbytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    if jax.process_index() == 0:
        outputs.require_space(directory.parent, nbytes + 2**20)
    ckpt = ocp.StandardCheckpointer()
    with _stderr_kept() as kept:
        try:
            with interrupts.deferred():
                ckpt.save(directory, tree, custom_metadata=custom_metadata)
                ckpt.wait_until_finished()
        except Exception as e:
            full = outputs.as_no_space(e, directory.parent, nbytes)
            if full is None:
                raise
            del e, ckpt
            # orbax's background threads said "disk full" in 300 lines of tracebacks: the one line says it. Its
            # failed futures report themselves when collected, now or at exit: those reports are dropped too.
            logging.getLogger("asyncio").addFilter(_AboutDirectory(directory))
            gc.collect()
            kept.clear()
            raise full from None


class _AboutDirectory(logging.Filter):
    """Drops log records that concern ``directory`` (asyncio's "exception was never retrieved" reports of a
    failed write there, already reported as one line)."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = str(directory)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return self.directory not in record.getMessage() and self.directory not in str(exc)


class _KeptStderr:
    def __init__(self, file):
        self.file, self.dropped = file, False

    def clear(self) -> None:
        self.dropped = True


@contextlib.contextmanager
def _stderr_kept() -> Iterator[_KeptStderr]:
    """Holds what is written to file descriptor 2 (Python, absl, asyncio and C++ alike) while the block runs,
    and writes it out afterwards unless the block `clear`-ed it; used around orbax's writer, whose background
    threads print pages of tracebacks for one failed write."""
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        kept = _KeptStderr(f)
        try:
            yield kept
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not kept.dropped:
                f.seek(0)
                data = f.read()
                if data:
                    sys.stderr.buffer.write(data) if hasattr(sys.stderr, "buffer") else sys.stderr.write(
                        data.decode(errors="replace"))
                    sys.stderr.flush()


def quant_layout(quant_config: dict, where: Path | None = None) -> dict[str, QuantScheme]:
    """{layer path: scheme} of a checkpoint; a scheme this version cannot run is a `CheckpointError`."""
    layout = {}
    for path, scheme in quant_config["layers"].items():
        try:
            layout[path] = QuantScheme.from_json(scheme)
        except (InputError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{where or 'checkpoint'}: layer {path}: {e} (upgrade afpq-jax or convert "
                                  f"again)") from None
    return layout


DTYPES = validation.FLOAT_DTYPES


def read_quant_config(path: Path) -> dict:
    """quantization_config.json of a converted checkpoint, checked by type: the fields `load` reads."""
    where = path / QUANT_CONFIG
    qc = files.read_json_object(where)
    if qc.get("checkpoint_format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint_format {qc.get('checkpoint_format')!r}; this afpq-jax reads "
                              f"{CHECKPOINT_FORMAT!r} — convert the model again")
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointError(f"{where}: 'layers' must be an object of layer path -> scheme, got "
                              f"{files.json_kind(layers) if 'layers' in qc else 'nothing'}; restore the file or "
                              f"convert again")
    if qc.get("dtype", "float32") not in DTYPES:
        raise CheckpointError(f"{where}: 'dtype' must be one of {', '.join(DTYPES)}, got {qc.get('dtype')!r}; "
                              f"restore the file or convert again")
    if not isinstance(qc.get("mlp_act_scale", False), bool):
        raise CheckpointError(f"{where}: 'mlp_act_scale' must be true or false, got {qc['mlp_act_scale']!r}")
    return qc


def _scheme_difference(written: dict, found: dict) -> str:
    keys = sorted(set(written) | set(found), key=str)
    return ", ".join(f"{k} {written.get(k)!r} -> {found.get(k)!r}" for k in keys if written.get(k) != found.get(k))


def _verify(path: Path, qc: dict, metadata, expected: Mapping[tuple, jax.ShapeDtypeStruct]) -> None:
    """The arrays on disk are the ones quantization_config.json describes: each layer's scheme and the dtype
    equal what was recorded beside the arrays when they were written, and every leaf has exactly the shape and
    dtype the layout implies (orbax would cast a dtype silently). A difference is a `CheckpointError` naming the
    layer."""
    where = path / QUANT_CONFIG
    custom = metadata.custom_metadata or {}
    written = custom.get("layers")
    if written is None:
        logger.warning("%s was written before afpq-jax recorded each layer's scheme beside its arrays: its "
                       "quantization_config.json cannot be verified (convert again to get a checked checkpoint)",
                       path)
    else:
        for layer in sorted(set(written) | set(qc["layers"])):
            a, b = written.get(layer), qc["layers"].get(layer)
            if a != b:
                what = ("is missing from the file" if b is None else "is not in the arrays" if a is None
                        else f"differs from the scheme its arrays were written with ({_scheme_difference(a, b)})")
                raise CheckpointError(f"{where}: layer {layer} {what}; the file was edited or comes from another "
                                      f"checkpoint — restore it or convert again")
        if custom.get("dtype") != qc.get("dtype", "float32"):
            raise CheckpointError(f"{where}: dtype {qc.get('dtype')!r} differs from the {custom.get('dtype')!r} the "
                                  f"arrays were written in; restore the file or convert again")
    item = metadata.item_metadata
    stored = {tuple(k): v for k, v in _flatten(getattr(item, "tree", item))}
    for p, want in expected.items():
        key = tuple(map(str, p))
        got = stored.pop(key, None)
        name = ".".join(key)
        if got is None:
            raise CheckpointError(f"{path / PARAMS_DIR} has no array {name}; the checkpoint is incomplete or its "
                                  f"quantization_config.json comes from another model — convert again")
        shape, dtype = tuple(got.shape), np.dtype(got.dtype)
        if shape != tuple(want.shape) or dtype != np.dtype(want.dtype):
            raise CheckpointError(f"{where}: {name} is stored as {dtype.name}{list(shape)} but the file describes "
                                  f"{np.dtype(want.dtype).name}{list(want.shape)}; the file was edited or comes from "
                                  f"another checkpoint — restore it or convert again")
    if stored:
        raise CheckpointError(f"{path / PARAMS_DIR} holds arrays the file does not describe (e.g. "
                              f"{'.'.join(next(iter(stored)))}); restore quantization_config.json or convert again")


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield prefix, tree


def load_converted(path: str | os.PathLike, mesh=None) -> CausalLM:
    """Restores a converted checkpoint into a ready model (packed weights stay packed); with a ``mesh``, every
    leaf is restored straight into its shard (`afpq_jax._src.sharding`): no host holds the whole model.
    Nothing is trusted unchecked: the JSON files by type, the arrays against the recorded schemes (`_verify`)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    qc = read_quant_config(path)
    hf = files.read_json_object(path / "config.json")
    cfg = config_from_hf(hf)
    if qc.get("mlp_act_scale"):
        cfg = dataclasses.replace(cfg, mlp_act_scale=True)
    layout = quant_layout(qc, path)
    asm = ModelAssembler(cfg, layout, jnp.dtype(qc.get("dtype", "float32")), mesh)
    params = path / PARAMS_DIR
    if not params.is_dir():
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ directory; the checkpoint is incomplete")
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata(params)
    except Exception as e:
        raise CheckpointError(f"cannot read the metadata of {params} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); the checkpoint is damaged — "
                              f"convert again") from None
    abstract = asm.abstract_state()
    _verify(path, qc, metadata, abstract)
    # an explicit target sharding everywhere: a checkpoint saved by several processes restores into one
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = _nested({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=asm.shardings.get(p, one_device))
                      for p, v in abstract.items()})
    try:
        restored = checkpointer.restore(params, target)
    except Exception as e:
        raise CheckpointError(f"cannot restore {params} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"the checkpoint is damaged or from another model — convert again") from None
    for p in abstract:
        asm.place(p, _leaf(restored, p))
    model = asm.finish()
    record = {k: v for k, v in qc.items() if k in RECORD_KEYS}
    model.checkpoint_info = CheckpointInfo(hf_config=json.dumps(hf, sort_keys=True), tokenizer_dir=str(path),
                                           source=qc.get("source"), source_kind=qc.get("source_kind"),
                                           quantization=json.dumps(record, sort_keys=True))
    return model


# ---- the public entry points -----------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None) -> CausalLM:
    """A ready NNX model from a converted afpq-jax checkpoint, a float Hugging Face directory (safetensors or
    Flax msgpack), a GGUF file, or a Hub id (needs network). ``model(input_ids)`` gives float32 logits.
    ``dtype`` applies to float checkpoints (a converted checkpoint keeps the dtype it was converted with).

    ``mesh``: a `jax.sharding.Mesh` with axes ``'model'`` (tensor parallel) and/or ``'data'`` (FSDP); every
    parameter, float or packed, becomes a sharded array on it (see `afpq_jax._src.sharding` for the split).
    A converted checkpoint is restored straight into the shards; a float checkpoint is read one tensor at a
    time on the host and each tensor placed on its shards at once."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"load takes a path or Hub id, got {type(path).__name__}")
    dt = validation.float_dtype(dtype)  # checked for converted checkpoints too, though they keep their own dtype
    if is_converted_checkpoint(path):
        return load_converted(path, mesh=mesh)
    source = sources.open_source(path)
    cfg = config_from_hf(source.config)
    method = hf_import.quant_method(source)
    if method is not None:  # GPTQ / AWQ / compressed-tensors / afpq layout: packed layers stay packed
        model = hf_import.load_quantized(source, cfg, dtype=dt, mesh=mesh)
        record = {"method": None, "imported_from": method}
        model.checkpoint_info = dataclasses.replace(CheckpointInfo.from_source(source),
                                                    hf_config=hf_import.float_config(source.config)
                                                    ).quantized(record)
        return model
    # with a mesh each array goes to its shards as it is read: no device holds the whole model
    model = load_float(CheckpointWeights(source, cfg), cfg, dtype=dt, mesh=mesh)
    model.checkpoint_info = CheckpointInfo.from_source(source)
    return model


def model_config(path: str | os.PathLike) -> ModelConfig:
    """The architecture of a model path (reads only its config and tensor index)."""
    if is_converted_checkpoint(path):
        return config_from_hf(files.read_json_object(Path(path) / "config.json"))
    return config_from_hf(sources.open_source(path).config)


def save(model: CausalLM, out_dir: str | os.PathLike, *, overwrite: bool = False,
         hf_config: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` as a packed afpq-jax checkpoint (what ``python -m afpq_jax.convert`` writes): an orbax tree
    of the state, config.json, quantization_config.json and the tokenizer files. Everything is written into a
    temporary sibling directory and renamed into place: nothing appears at ``out_dir`` if anything fails.

    ``hf_config`` is needed only for a model that did not come from `load` / `quantize_pretrained`.
    ``out_dir`` must not be, or contain, the model the weights came from or the working directory; with
    ``overwrite`` it may replace only an afpq-jax checkpoint (`afpq_jax._src.io.outputs.claim`).
    """
    if not isinstance(model, CausalLM):
        raise InputError(f"save expects an afpq_jax CausalLM, got {type(model).__name__}")
    out = Path(out_dir)
    info = model.checkpoint_info
    inputs = [] if info is None else [info.source if info.source_kind != "model" else None, info.tokenizer_dir,
                                      info.gguf_path]
    hf = hf_config if hf_config is not None else (json.loads(info.hf_config) if info and info.hf_config else None)
    if hf is None:
        raise InputError("this model carries no Hugging Face config.json (it was not made by load / "
                         "quantize_pretrained); pass save(..., hf_config=...)")
    record = json.loads(info.quantization) if info and info.quantization else {
        "method": None, "source": info.source if info else None, "source_kind": info.source_kind if info else None}
    linears = model.linear_layers()
    layout = {p: m.scheme for p, m in linears.items() if m.is_quantized}
    q_params, q_bytes = model.quantized_size()
    quant_config = {
        **record, "checkpoint_format": CHECKPOINT_FORMAT, "quant_method": "afpq-jax",
        "mlp_act_scale": model.cfg.mlp_act_scale, "dtype": jnp.dtype(model.dtype).name,
        "lm_head_quantized": "lm_head" in layout, "layers": {p: s.to_json() for p, s in layout.items()},
        "packing": "bit planes along the input axis, LSB first (afpq_jax/_src/packing.py)",
        "bits_per_weight": round(8 * q_bytes / max(1, q_params), 4),
    }
    with staging_dir(out, overwrite, inputs=inputs) as tmp:
        write(model, tmp, hf_config=hf, quant_config=quant_config)
    return out.absolute()
