"""The public entry points: `load` a model, `quantize_pretrained` it in memory, `save` the packed checkpoint.

``python -m afpq_jax.convert`` is `quantize_pretrained` followed by `save`; both write the same checkpoint.
What a checkpoint records besides the weights (the source's config.json, tokenizer location, method, rules,
calibration options, per-block report) travels with the model as its `CheckpointInfo`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src import algorithms  # noqa: F401  (registers the built-in methods)
from afpq_jax._src import checkpoint
from afpq_jax._src import validation
from afpq_jax._src.algorithms.activations import ActivationQuant, WithActivations
from afpq_jax._src.algorithms.clip import ClipSearch
from afpq_jax._src.calibration import driver, taps
from afpq_jax._src.calibration.data import Calibration
from afpq_jax._src.calibration.method import Method, get_method
from afpq_jax._src.calibration.progress import BlockProgress
from afpq_jax._src.calibration.progress import fingerprint as progress_fingerprint
from afpq_jax._src.calibration.timer import PhaseTimer
from afpq_jax._src.checkpoint import CheckpointInfo
from afpq_jax._src.errors import ArgumentTypeError, CheckpointError, InputError
from afpq_jax._src.io import files, sources
from afpq_jax._src.loading import CheckpointWeights, ModelWeights, load_float
from afpq_jax._src.models import CausalLM, ModelConfig, config_from_hf, linear_paths
from afpq_jax._src.scheme import QuantRule, QuantScheme, as_rules, resolve_rules, rules_to_json, unused_rules
from afpq_jax._src.sharding import check_mesh, shard_model
from afpq_jax._src.training import data as qat_data
from afpq_jax._src.training import trainer as training
from afpq_jax._src.training.data import SelfGeneratedData
from afpq_jax._src.training.student import export_student, make_student
from afpq_jax._src.training.trainer import QATConfig

logger = logging.getLogger("afpq_jax")

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(dtype) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dt


def _source_info(source: sources.Source) -> CheckpointInfo:
    return CheckpointInfo(hf_config=json.dumps(source.config, sort_keys=True),
                          tokenizer_dir=None if source.tokenizer_dir is None else str(source.tokenizer_dir),
                          gguf_path=str(source.path) if source.kind == "gguf" else None,
                          source=str(source.path), source_kind=source.kind)


def _check_model_arg(model, what: str) -> None:
    if not isinstance(model, (str, os.PathLike, CausalLM)) or (what == "load" and isinstance(model, CausalLM)):
        kinds = "a path or Hub id" if what == "load" else "a path, a Hub id or an afpq_jax CausalLM"
        raise ArgumentTypeError(f"{what} takes {kinds}, got {type(model).__name__}")


def load(path: str | os.PathLike, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None) -> CausalLM:
    """A ready NNX model from a converted afpq-jax checkpoint, a float Hugging Face directory (safetensors or
    Flax msgpack), a GGUF file, or a Hub id (needs network). ``model(input_ids)`` gives float32 logits.
    ``dtype`` applies to float checkpoints (a converted checkpoint keeps the dtype it was converted with).

    ``mesh``: a `jax.sharding.Mesh` with axes ``'model'`` (tensor parallel) and/or ``'data'`` (FSDP); every
    parameter, float or packed, becomes a sharded array on it (see `afpq_jax._src.sharding` for the split).
    A converted checkpoint is restored straight into the shards; a float checkpoint is read one tensor at a
    time on the host and each tensor placed on its shards at once."""
    _check_model_arg(path, "load")
    dt = _dtype(dtype)  # checked for converted checkpoints too, though they keep their own dtype
    if checkpoint.is_converted_checkpoint(path):
        return checkpoint.load(path, mesh=mesh)
    source = sources.open_source(path)
    cfg = config_from_hf(source.config)
    # with a mesh each array goes to its shards as it is read: no device holds the whole model
    model = load_float(CheckpointWeights(source, cfg), cfg, dtype=dt, mesh=mesh)
    model.checkpoint_info = _source_info(source)
    return model


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer that belongs to a model path (directory with tokenizer files, or a GGUF file)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found": we never run torch
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file():
        from afpq_jax._src.io import gguf as gguf_io
        tok = gguf_io.build_tokenizer(gguf_io.read_gguf_tokenizer_metadata(p))
        return PreTrainedTokenizerFast(tokenizer_object=tok)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{p} has no tokenizer files (tokenizer.json / tokenizer.model); copy them from the "
                              f"original model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (p / name).exists():  # a damaged file is named here, not in a tokenizers / transformers traceback
            files.read_json_object(p / name)
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # the library's own checks of a user's files: their message, one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read the tokenizer in {p} ({type(e).__name__}: {first}); restore its "
                              f"tokenizer files from the original model") from None


def tokenize(tokenizer, text: str, chunk_chars: int = 100_000) -> np.ndarray:
    """Token ids of a long text as int32, encoded paragraph-aligned chunk by chunk: one fast-tokenizer call on
    a multi-megabyte string holds offsets and masks for every token (measured: +300 MB RSS for 2.3 MB of text)."""
    parts, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        parts.append(np.asarray(tokenizer(text[start:end], add_special_tokens=False)["input_ids"], np.int32))
        start = end
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def model_config(path: str | os.PathLike) -> ModelConfig:
    """The architecture of a model path (reads only its config and tensor index)."""
    if checkpoint.is_converted_checkpoint(path):
        return config_from_hf(files.read_json_object(Path(path) / "config.json"))
    return config_from_hf(sources.open_source(path).config)


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


def _with_activations(method: Method, activations: ActivationQuant | None,
                      layout: dict[str, QuantScheme]) -> Method:
    """The method that also quantizes activations, if the policy or any layer's scheme asks for it."""
    if activations is not None and not isinstance(activations, ActivationQuant):
        raise InputError(f"activations must be an afpq_jax.ActivationQuant, got {type(activations).__name__}")
    explicit = [s for s in layout.values() if s.quantizes_activations]
    if activations is None and not explicit:
        return method
    if activations is not None:
        activations.validate()
        for path, scheme in layout.items():  # every format must have an integer path (NF has none)
            if not scheme.quantizes_activations:
                try:
                    scheme.with_activations(activations.bits, "dynamic")
                except InputError as e:
                    raise InputError(f"layer {path}: {e}") from None
    return WithActivations(weights=method, activations=activations,
                           explicit_static=any(s.act_mode == "static" for s in explicit))


def _tokenizer_location(info: CheckpointInfo | None) -> str | None:
    if info is None:
        return None
    return info.gguf_path or info.tokenizer_dir


def _text_tokenizer(info: CheckpointInfo | None):
    """``text -> token ids`` with the model's tokenizer (a one-line error when the model has none)."""
    tok_path = _tokenizer_location(info)

    def tokenize_text(text: str) -> np.ndarray:
        if tok_path is None:
            raise InputError("calibration text needs the model's tokenizer, and this model has none; pass "
                             "Calibration(token_ids=...) or Calibration(random=True)")
        return tokenize(load_tokenizer(tok_path), text)

    return tokenize_text


def _calibration_windows(calibration: Calibration, cfg: ModelConfig, info: CheckpointInfo | None) -> np.ndarray:
    """The calibration windows (samples, seqlen) of a model, tokenizing text with the model's tokenizer."""
    calibration.validate()
    return calibration.windows(cfg.vocab_size, cfg.max_seq_len, _text_tokenizer(info))


def _layout(rules, cfg: ModelConfig) -> dict[str, QuantScheme]:
    """{layer path: scheme} of the rules over this architecture (warns about rules that decide nothing)."""
    paths = linear_paths(cfg)
    layout = resolve_rules(rules, paths)
    for rule in unused_rules(rules, paths):
        if rule.scheme is None:
            continue  # keeping absent layers float is harmless (e.g. the lm_head rule on a tied model)
        logger.warning("quantization rule %r decides no layer of this model (layer paths look like %s)",
                       rule.pattern, paths[0])
    if not layout:
        raise InputError("the rules quantize no layer of this model; layer paths look like "
                         f"{paths[0]!r} (patterns must match the whole path)")
    return layout


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
        conversion: same model, rules, method, options, calibration and dtype), else it is started over. The
        result equals an uninterrupted run's. Delete the directory once the model is saved.
    mesh: calibration minibatches are split over its ``'data'`` axis (``Calibration.batch_size`` must be a
        multiple of its size to take effect) and the returned model is placed on it like `load` places one.
    max_memory: bytes of host memory for the conversion; calibration activations larger than half of it are kept
        in a file in ``spill_dir`` (default: the temporary directory), read by minibatch, deleted at the end.
    """
    rules = as_rules(rules)
    _check_model_arg(model, "quantize_pretrained")
    m = resolve_method(method, clip)
    if isinstance(model, CausalLM):
        weights, cfg, info = ModelWeights(model), model.cfg, model.checkpoint_info
        dt = _dtype(dtype or model.dtype)
        source_name, source_kind = (info.source, info.source_kind) if info else ("<in-memory model>", "model")
    else:
        source = sources.open_source(model)
        cfg = config_from_hf(source.config)
        weights, info, dt = CheckpointWeights(source, cfg), _source_info(source), _dtype(dtype or "float32")
        source_name, source_kind = str(model), source.kind
    layout = _layout(rules, cfg)
    weight_method = m
    m = _with_activations(m, activations, layout)
    windows = None
    if m.calibrated:
        if calibration is None:
            raise InputError(f"method {m.name!r} needs calibration data: pass calibration=afpq_jax.Calibration("
                             f"text=...) (afpq_jax.assets.wiki_text() is the Wikipedia split the CLI uses)")
        windows = _calibration_windows(calibration, cfg, info)
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
    with taps.data_parallel(mesh) if mesh is not None else contextlib.nullcontext():
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
        "rules": rules_to_json(rules), "report": report, "source": source_name, "source_kind": source_kind,
    }
    qmodel.checkpoint_info = CheckpointInfo(
        hf_config=info.hf_config if info else None, tokenizer_dir=info.tokenizer_dir if info else None,
        gguf_path=info.gguf_path if info else None, source=source_name, source_kind=source_kind,
        quantization=json.dumps(record, sort_keys=True), phase_seconds=tuple(seconds.items()))
    return qmodel


@dataclasses.dataclass
class QATResult:
    """What `train_qat` produced: the packed ``model`` (write it with `save`), the trained fake-quant ``student``,
    the loss history (``{"step", "loss"[, "eval_perplexity"]}`` per step), CAKLD's γ, steps, tokens and seconds."""

    model: CausalLM
    student: CausalLM
    history: list[dict]
    gamma: float
    steps: int
    tokens: int
    seconds: float


def train_qat(model: str | os.PathLike | CausalLM, rules: QuantScheme | QuantRule | Iterable[QuantRule], *,
              config: QATConfig | None = None, data: SelfGeneratedData | np.ndarray | None = None,
              calibration: Calibration | None = None, clip: ClipSearch | None = ClipSearch(),
              eval_ids: np.ndarray | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: bool = False, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
              progress: bool = True) -> QATResult:
    """Quantization-aware training with self-distillation (BitDistiller): the float ``model`` is the teacher; the
    student is the same model with the layers the ``rules`` quantize in fake-quant mode, initialised with the
    two-sided clipping search on ``calibration`` (``clip=None`` skips it), trained with ``config`` (`QATConfig`:
    CAKLD by default) on ``data`` — token ids ``(n, L)``, or `SelfGeneratedData` (default): sequences the teacher
    samples from prompts of the calibration data — and exported to packed weights (`QATResult.model`, written by
    `save` exactly like a conversion). ``checkpoint_dir`` / ``resume``: orbax training checkpoints; ``mesh``: a
    `jax.sharding.Mesh` with a ``data`` axis (FSDP); ``eval_ids``: held-out token stream for ``eval_every``.
    """
    config = validation.instance(QATConfig() if config is None else config, QATConfig, "config",
                                 "an afpq_jax.QATConfig(...)")
    config.validate()
    clip = ClipSearch.coerce(clip, "clip")
    if data is not None and not isinstance(data, SelfGeneratedData):
        data = validation.token_ids(data, "QAT data")
    if calibration is not None:
        validation.instance(calibration, Calibration, "calibration", "an afpq_jax.Calibration(...)")
    rules = as_rules(rules)
    teacher = model if isinstance(model, CausalLM) else load(model, dtype=dtype or "float32")
    info = teacher.checkpoint_info
    layout = _layout(rules, teacher.cfg)
    if calibration is None and (clip is not None or data is None or isinstance(data, SelfGeneratedData)):
        raise InputError("QAT needs calibration data for the clipping init and the self-generated prompts: pass "
                         "calibration=afpq_jax.Calibration(text=...) (or clip=None with data=token ids)")
    calibration_record = None if calibration is None else calibration.options_json()
    if calibration is not None and calibration.text is not None:  # tokenized once for the clip windows and prompts
        calibration.validate()
        calibration = dataclasses.replace(calibration, text=None, token_ids=_text_tokenizer(info)(calibration.text))
    windows = None
    if clip is not None:
        clip.validate()
        windows = _calibration_windows(calibration, teacher.cfg, info)
    if data is None or isinstance(data, SelfGeneratedData):
        gen = data or SelfGeneratedData()
        gen.validate()
        data = _self_generated(teacher, gen, calibration, info, progress)
        data_record = {"kind": "self-generated", **gen.to_json()}
    else:
        data = np.asarray(data)
        data_record = {"kind": "token ids", "shape": list(data.shape)}
    student, clip_report = make_student(teacher, layout, windows=windows, calibration=calibration, clip=clip,
                                        progress=progress)
    result = training.train(student, teacher, data, config, eval_ids=eval_ids, checkpoint_dir=checkpoint_dir,
                            resume=resume, mesh=mesh, progress=progress)
    packed = export_student(result.student)
    source_name, source_kind = (info.source, info.source_kind) if info else ("<in-memory model>", "model")
    final = result.history[-1] if result.history else {}
    record = {
        "method": "qat", "method_options": {"name": "qat", **config.to_json()},
        "clip": clip is not None, "activations": None, "data": data_record,
        "calibration": calibration_record,
        "rules": rules_to_json(rules), "report": clip_report, "source": source_name, "source_kind": source_kind,
        "training": {"steps": result.steps, "tokens": result.tokens, "gamma": result.gamma,
                     "final_loss": final.get("loss"), "seconds": result.seconds},
    }
    packed.checkpoint_info = CheckpointInfo(
        hf_config=info.hf_config if info else None, tokenizer_dir=info.tokenizer_dir if info else None,
        gguf_path=info.gguf_path if info else None, source=source_name, source_kind=source_kind,
        quantization=json.dumps(record, sort_keys=True), phase_seconds=(("train", result.seconds),))
    return QATResult(model=packed, student=result.student, history=result.history, gamma=result.gamma,
                     steps=result.steps, tokens=result.tokens, seconds=result.seconds)


def _self_generated(teacher: CausalLM, gen: SelfGeneratedData, calibration: Calibration,
                    info: CheckpointInfo | None, progress: bool) -> np.ndarray:
    if gen.prompt_file is not None:
        tok_path = _tokenizer_location(info)
        if tok_path is None:
            raise InputError("a prompt file needs the model's tokenizer, and this model has none")
        lines = qat_data.read_prompt_file(gen.prompt_file, load_tokenizer(tok_path))
        long_enough = [ids[: gen.prompt_len] for ids in lines if len(ids) >= gen.prompt_len]
        if not long_enough:
            raise InputError(f"no line of {gen.prompt_file} has {gen.prompt_len} tokens; use a smaller prompt_len")
        rng = np.random.default_rng(gen.seed)
        prompts = np.stack([long_enough[i] for i in rng.integers(0, len(long_enough), gen.samples)])
    else:
        prompts = _calibration_windows(dataclasses.replace(calibration, samples=gen.samples, seqlen=gen.prompt_len,
                                                           seed=gen.seed), teacher.cfg, info)
    if gen.cache_dir is not None:
        cache = gen.cache_dir
    else:  # afpq-jax's cache directory (imported here: `import afpq_jax` never loads the asset fetcher)
        from afpq_jax._src.assets import cache_dir
        cache = str(cache_dir() / "selfgen")
    import hashlib  # the teacher's identity: its provenance and a digest of its embeddings and final norm
    digest = hashlib.sha256(np.asarray(teacher.embed.weight.get_value()).tobytes())
    digest.update(np.asarray(teacher.final_norm.weight.get_value()).tobytes())
    fingerprint = json.dumps({"source": info.source if info else None, "config": info.hf_config if info else None,
                              "weights": digest.hexdigest()}, sort_keys=True)
    return qat_data.self_generated(teacher, prompts, new_tokens=gen.new_tokens, temperature=gen.temperature,
                                   batch_size=gen.batch_size, seed=gen.seed, cache_dir=cache,
                                   fingerprint=fingerprint, progress=progress)


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
    q_params = sum(linears[p].in_features * linears[p].out_features for p in layout)
    q_bytes = sum(linears[p].quantized_tensor().nbytes for p in layout)
    quant_config = {
        **record, "checkpoint_format": checkpoint.CHECKPOINT_FORMAT, "quant_method": "afpq-jax",
        "mlp_act_scale": model.cfg.mlp_act_scale, "dtype": jnp.dtype(model.dtype).name,
        "lm_head_quantized": "lm_head" in layout, "layers": {p: s.to_json() for p, s in layout.items()},
        "packing": "bit planes along the input axis, LSB first (afpq_jax/_src/packing.py)",
        "bits_per_weight": round(8 * q_bytes / max(1, q_params), 4),
    }
    with checkpoint.staging_dir(out, overwrite, inputs=inputs) as tmp:
        if info is not None and info.gguf_path and jax.process_index() == 0:
            from afpq_jax._src.io import gguf as gguf_io
            gguf_io.write_hf_tokenizer(Path(info.gguf_path), tmp)
        checkpoint.save(model, tmp, hf_config=hf, quant_config=quant_config,
                        tokenizer_dir=None if info is None or info.tokenizer_dir is None else Path(info.tokenizer_dir))
    return out.absolute()


@dataclasses.dataclass
class ConvertSummary:
    """What a conversion produced (printed by the CLI)."""

    out: Path
    layers: int
    quantized_params: int
    quantized_bytes: int
    float_params: int
    disk_bytes: int
    seconds: float
    phase_seconds: dict = dataclasses.field(default_factory=dict)
    activation_modes: dict = dataclasses.field(default_factory=dict)  # {"int8 static": n layers, ...}
    folds: dict = dataclasses.field(default_factory=dict)  # {"lae": n layers, ...}

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(1, self.quantized_params)

    def lines(self) -> list[str]:
        return [f"quantized layers : {self.layers}",
                f"quantized params : {self.quantized_params:,} at {self.bits_per_weight:.3f} bits/weight "
                f"({self.quantized_bytes / 2**20:.1f} MiB)",
                f"float params     : {self.float_params:,} (embeddings, norms, biases, unquantized heads)",
                f"size on disk     : {self.disk_bytes / 2**20:.1f} MiB  ->  {self.out}",
                f"time             : {self.seconds:.1f} s"] + (
                    ["activations      : " + ", ".join(f"{k} {v}" for k, v in self.activation_modes.items())
                     + ("" if not self.folds else " (folded: " + ", ".join(f"{k} {v}" for k, v in
                                                                           self.folds.items()) + ")")]
                    if self.activation_modes else []) + (
                    ["  " + ", ".join(f"{k} {v:.1f}s" for k, v in self.phase_seconds.items())]
                    if self.phase_seconds else [])


def summarize(model: CausalLM, out: str | os.PathLike, seconds: float) -> ConvertSummary:
    linears = model.linear_layers()
    q = [m for m in linears.values() if m.is_quantized]
    out = Path(out)
    info = model.checkpoint_info
    return ConvertSummary(
        out=out.absolute(), layers=len(q), quantized_params=sum(m.in_features * m.out_features for m in q),
        quantized_bytes=sum(m.quantized_tensor().nbytes for m in q),
        float_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
        disk_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()), seconds=seconds,
        phase_seconds=dict(info.phase_seconds) if info else {},
        activation_modes=_count(f"int{m.scheme.act_bits} {m.scheme.act_mode}" for m in q
                                if m.scheme.quantizes_activations),
        folds=_count(d["fold"] for facts in _report(info).values() for d in facts.get("activations", {}).values()
                     if d.get("fold")))


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return dict(sorted(out.items()))


def _report(info: CheckpointInfo | None) -> dict:
    if info is None or not info.quantization:
        return {}
    return json.loads(info.quantization).get("report") or {}


