"""Quantization-aware training of a whole model (BitDistiller): `train_qat` (what ``python -m afpq_jax.train``
runs before `checkpoint.save`).

The float model is the teacher; the student is the same model with its quantized layers in fake-quant mode
(`student.make_student`, clipping init included), trained against the teacher (`trainer.train`) on token ids or
on sequences the teacher writes itself (`data.self_generated`), then exported to packed weights with the
provenance a conversion records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable

import jax
import numpy as np

from afpq_jax._src import validation
from afpq_jax._src.algorithms.clip import ClipSearch
from afpq_jax._src.calibration.data import Calibration
from afpq_jax._src.checkpoint import IN_MEMORY, CheckpointInfo, load
from afpq_jax._src.errors import InputError
from afpq_jax._src.io import outputs
from afpq_jax._src.io.tokenizers import TextTokenizer, load_tokenizer
from afpq_jax._src.models import CausalLM, linear_paths
from afpq_jax._src.scheme import QuantRule, QuantScheme, as_rules, resolve_layout, rules_to_json
from afpq_jax._src.training import data as qat_data
from afpq_jax._src.training import trainer as training
from afpq_jax._src.training.data import SelfGeneratedData
from afpq_jax._src.training.student import export_student, make_student
from afpq_jax._src.training.trainer import QATConfig, TrainResult


@dataclasses.dataclass(kw_only=True)
class QATResult(TrainResult):
    """What `train_qat` produced: the packed ``model`` (write it with `save`), and the `TrainResult` — the trained
    fake-quant ``student``, the loss history (``{"step", "loss"[, "eval_perplexity"]}`` per step), CAKLD's γ,
    steps, tokens and seconds."""

    model: CausalLM


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
    tokenizer_path = info.tokenizer_path if info else None
    layout = resolve_layout(rules, linear_paths(teacher.cfg))
    if calibration is None and (clip is not None or data is None or isinstance(data, SelfGeneratedData)):
        raise InputError("QAT needs calibration data for the clipping init and the self-generated prompts: pass "
                         "calibration=afpq_jax.Calibration(text=...) (or clip=None with data=token ids)")
    calibration_record = None if calibration is None else calibration.options_json()
    bos = None
    if calibration is not None and calibration.text is not None:  # tokenized once for the clip windows and prompts
        calibration.validate()
        tokenizer = TextTokenizer(tokenizer_path)
        calibration = dataclasses.replace(calibration, text=None, token_ids=tokenizer(calibration.text))
        bos = tokenizer.bos_token_id
    windows = None
    if clip is not None:
        clip.validate()
        windows = calibration.windows(teacher.cfg.vocab_size, teacher.cfg.max_seq_len, bos_token_id=bos)
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
    final = result.history[-1] if result.history else {}
    record = {
        "method": "qat", "method_options": {"name": "qat", **config.to_json()},
        "clip": clip is not None, "activations": None, "data": data_record,
        "calibration": calibration_record, "rules": rules_to_json(rules), "report": clip_report,
        "training": {"steps": result.steps, "tokens": result.tokens, "gamma": result.gamma,
                     "final_loss": final.get("loss"), "seconds": result.seconds},
    }
    packed.checkpoint_info = (info or IN_MEMORY).quantized(record, phase_seconds=(("train", result.seconds),))
    return QATResult(model=packed, **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)})


def _self_generated(teacher: CausalLM, gen: SelfGeneratedData, calibration: Calibration,
                    info: CheckpointInfo | None, progress: bool) -> np.ndarray:
    """The training sequences the teacher writes from prompts (the prompt file's lines, or calibration windows),
    cached by the teacher's identity."""
    if gen.prompt_file is not None:
        tok_path = info.tokenizer_path if info else None
        if tok_path is None:
            raise InputError("a prompt file needs the model's tokenizer, and this model has none")
        lines = qat_data.read_prompt_file(gen.prompt_file, load_tokenizer(tok_path))
        long_enough = [ids[: gen.prompt_len] for ids in lines if len(ids) >= gen.prompt_len]
        if not long_enough:
            raise InputError(f"no line of {gen.prompt_file} has {gen.prompt_len} tokens; use a smaller prompt_len")
        rng = np.random.default_rng(gen.seed)
        prompts = np.stack([long_enough[i] for i in rng.integers(0, len(long_enough), gen.samples)])
    else:
        prompts = dataclasses.replace(calibration, samples=gen.samples, seqlen=gen.prompt_len, seed=gen.seed
                                      ).windows(teacher.cfg.vocab_size, teacher.cfg.max_seq_len)
    cache = gen.cache_dir if gen.cache_dir is not None else str(outputs.cache_dir() / "selfgen")
    # the teacher's identity: its provenance and a digest of its embeddings and final norm
    digest = hashlib.sha256(np.asarray(teacher.embed.weight.get_value()).tobytes())
    digest.update(np.asarray(teacher.final_norm.weight.get_value()).tobytes())
    fingerprint = json.dumps({"source": info.source if info else None, "config": info.hf_config if info else None,
                              "weights": digest.hexdigest()}, sort_keys=True)
    return qat_data.self_generated(teacher, prompts, new_tokens=gen.new_tokens, temperature=gen.temperature,
                                   batch_size=gen.batch_size, seed=gen.seed, cache_dir=cache,
                                   fingerprint=fingerprint, progress=progress)
