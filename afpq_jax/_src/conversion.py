"""Post-training quantization of a whole model: `quantize_pretrained` (what ``python -m afpq_jax.convert`` runs
before `checkpoint.save`).

It resolves the rules over the model's layers, the method (with the clipping search and the activation step
the options ask for) and the calibration windows, then hands everything to the block-by-block driver
(`calibration.driver`) and records what was done in the model's `CheckpointInfo`. It sits above the calibration
driver and the algorithms (which plug into the driver), so neither package needs the other's entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable

import jax

from afpq_jax._src import algorithms  # noqa: F401  (registers the built-in methods)
from afpq_jax._src import validation
from afpq_jax._src.algorithms.activations import ActivationQuant, with_activations
from afpq_jax._src.algorithms.clip import ClipSearch
from afpq_jax._src.calibration import driver
from afpq_jax._src.calibration.data import Calibration
from afpq_jax._src.calibration.method import Method, get_method
from afpq_jax._src.calibration.progress import BlockProgress
from afpq_jax._src.calibration.progress import fingerprint as progress_fingerprint
from afpq_jax._src.calibration.timer import PhaseTimer
from afpq_jax._src.checkpoint import IN_MEMORY, CheckpointInfo
from afpq_jax._src.errors import ArgumentTypeError, InputError
from afpq_jax._src.io import sources
from afpq_jax._src.io.tokenizers import TextTokenizer
from afpq_jax._src.loading import CheckpointWeights, ModelWeights
from afpq_jax._src.models import CausalLM, config_from_hf, linear_paths
from afpq_jax._src.scheme import QuantRule, QuantScheme, as_rules, resolve_layout, rules_to_json
from afpq_jax._src.sharding import check_mesh, data_parallel, shard_model


def resolve_method(method: str | Method, clip: bool | None) -> Method:
    """The method instance for a name or instance, with the clipping search forced on/off by ``clip``."""
    m = get_method(method)
    if clip is None:
        return m
    if not any(f.name == "clip" for f in dataclasses.fields(m)):
        if not clip:
            return m
        raise InputError(f"the clipping search does not apply to method {m.name!r} (it sets its scales itself); "
                         f"drop clip / --clip")
    current = getattr(m, "clip")
    return get_method(m, clip=(current or ClipSearch()) if clip else None)


def quantize_pretrained(model: str | os.PathLike | CausalLM, rules: QuantScheme | QuantRule | Iterable[QuantRule],
                        *, method: str | Method = "rtn", calibration: Calibration | None = None,
                        clip: bool | None = None, activations: ActivationQuant | None = None,
                        dtype: str | None = None,
                        progress: bool = True, timer: PhaseTimer | None = None,
                        progress_dir: str | os.PathLike | None = None, resume: bool = False,
                        mesh: jax.sharding.Mesh | None = None, max_memory: int | None = None,
                        spill_dir: str | os.PathLike | None = None) -> CausalLM:
    """Quantizes a float model in memory and returns the quantized `CausalLM` (write it with `save`).

    model: a Hugging Face directory, a GGUF file, a Hub id, or an in-memory float `CausalLM` (left unchanged).
    rules: `QuantRule`s over layer paths (first match wins, ``scheme=None`` keeps a layer float, unmatched layers
        stay float), or one `QuantScheme` for every decoder linear (lm_head stays float).
    method: a registered name ("rtn", "gptq", "awq", ...) or a `Method` instance with its options.
    calibration: the calibration data and batching (`Calibration`); needed by calibrated methods.
    clip: force the two-sided clipping search on or off (None: the method's default; AWQ on, RTN off).
    activations: int8 activation quantization of the quantized layers (`ActivationQuant`: FPTQ's layer-wise rule,
        static, dynamic or SmoothQuant) on top of the weight method; None keeps float activations except where
        a rule's scheme names ``act_bits`` / ``act_mode`` itself.
    dtype: of the unquantized parameters and of compute (default float32; an in-memory model's own dtype).
    timer: a `PhaseTimer` (subclass) to observe the conversion's phases and blocks.
    progress_dir: save every finished block there (with the next block's calibration inputs), so that an
        interrupted conversion can continue; ``resume=True`` continues from what it holds (it must be the same
        conversion: same model weights, rules, method, options, calibration and dtype), else it is started over.
        The result equals an uninterrupted run's. Delete the directory once the model is saved.
    mesh: calibration minibatches are split over its ``'data'`` axis (``Calibration.batch_size`` must be a
        multiple of its size to take effect) and the returned model is placed on it like `load` places one.
    max_memory: bytes of host memory for the conversion; calibration activations larger than half of it are kept
        in a file in ``spill_dir`` (default: the temporary directory), read by minibatch, deleted at the end.
    """
    rules = as_rules(rules)
    if not isinstance(model, (str, os.PathLike, CausalLM)):
        raise ArgumentTypeError(f"quantize_pretrained takes a path, a Hub id or an afpq_jax CausalLM, got "
                                f"{type(model).__name__}")
    m = resolve_method(method, clip)
    if isinstance(model, CausalLM):
        weights, cfg, info = ModelWeights(model), model.cfg, model.checkpoint_info or IN_MEMORY
        dt = validation.float_dtype(dtype or model.dtype)
        source_name, source_kind = info.source, info.source_kind
    else:
        source = sources.open_source(model)
        cfg = config_from_hf(source.config)
        weights, info = CheckpointWeights(source, cfg), CheckpointInfo.from_source(source)
        dt = validation.float_dtype(dtype or "float32")
        source_name, source_kind = str(model), source.kind
    layout = resolve_layout(rules, linear_paths(cfg))
    weight_method = m
    m = with_activations(m, activations, layout)
    windows = None
    if m.calibrated:
        if calibration is None:
            raise InputError(f"method {m.name!r} needs calibration data: pass calibration=afpq_jax.Calibration("
                             f"text=...) (afpq_jax.assets.wiki_text() is the Wikipedia split the CLI uses)")
        calibration.validate()  # its own errors before the tokenizer's
        tokenizer = TextTokenizer(info.tokenizer_path)
        bos = tokenizer.bos_token_id if calibration.text is not None else None
        windows = calibration.windows(cfg.vocab_size, cfg.max_seq_len, tokenizer, bos)
    qcfg = m.prepare_config(cfg)
    store = None
    if progress_dir is not None and jax.process_count() > 1:
        raise InputError("saving progress (--save-progress / --resume, progress_dir=) is for single-process "
                         "conversions; run multi-process conversions without it")
    if progress_dir is not None:
        method_json = {"name": m.name, "options": weight_method.to_json(),
                       "activations": None if activations is None else activations.to_json()}
        store = BlockProgress(progress_dir, progress_fingerprint(
            qcfg, layout, method_json, calibration.options_json() if m.calibrated else None, windows, dt))
        if not resume:
            store.start_over()
    elif resume:
        raise InputError("resume=True needs progress_dir (the directory an interrupted conversion saved to)")
    if mesh is not None:
        mesh = check_mesh(mesh)
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                   or max_memory <= 0):
        raise InputError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    with data_parallel(mesh) if mesh is not None else contextlib.nullcontext():
        qmodel, report, seconds = driver.run(weights, qcfg, layout, m, windows,
                                             calibration if m.calibrated else None, dtype=dt, progress=progress,
                                             timer=timer, store=store, max_memory=max_memory,
                                             spill_dir=None if spill_dir is None else str(spill_dir))
    if mesh is not None:
        shard_model(qmodel, mesh)
    record = {
        "method": weight_method.name, "method_options": weight_method.to_json(),
        "clip": getattr(weight_method, "clip", None) is not None,
        "activations": None if activations is None else activations.to_json(),
        "calibration": calibration.options_json() if m.calibrated else None,
        "rules": rules_to_json(rules), "report": report,
    }
    qmodel.checkpoint_info = info.quantized(record, source=source_name, source_kind=source_kind,
                                            phase_seconds=seconds.items())
    return qmodel
