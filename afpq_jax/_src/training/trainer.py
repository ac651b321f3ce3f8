"""The QAT loop (BitDistiller's recipe): a fake-quant student distilled from its frozen float teacher with optax
AdamW, gradient accumulation, optional bf16 compute over float32 master weights, per-block rematerialization,
orbax training checkpoints that resume bit-exactly, and data / parameter sharding over a device mesh.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences (a `lax.scan` summing gradients
inside one jitted step), then one AdamW update. The batch order is a pure function of (seed, position), and a
checkpoint holds parameters, optimizer state, the data position and the estimated γ, so a resumed run takes the
same batches and computes the same numbers as an uninterrupted one.

Sharding (``mesh``): parameters and optimizer state are sharded FSDP-style over the mesh's ``data`` axis (each
array's first axis that divides evenly; smaller arrays replicated), batches over ``data`` on the batch axis;
XLA inserts the all-gathers and reduce-scatters (the mesh's axes must be ``AxisType.Auto``, e.g.
``jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))``). Without a mesh the same code runs on the
default device.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from afpq_jax._src import validation
from afpq_jax._src.errors import InputError, QuantizationError
from afpq_jax._src.evaluation import perplexity
from afpq_jax._src.models import CausalLM
from afpq_jax._src.sharding import check_mesh, place_batch, place_fsdp
from afpq_jax._src.training import data as data_lib
from afpq_jax._src.training import losses
from afpq_jax._src.training.student import trainable_filter

SCHEDULES = ("constant", "cosine", "linear")
COMPUTE_DTYPES = ("float32", "bfloat16")
_RESUMABLE_FIELDS = ("steps", "eval_every", "checkpoint_every")  # may change between a run and its resume


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig:
    """Options of quantization-aware training (defaults: BitDistiller's, except the batch size for small machines).

    loss: one of `losses.LOSSES`; gamma: CAKLD's γ (None: the teacher's confidence over ``gamma_batches``
    batches, ``confidence`` = "max_prob" (BitDistiller's code) or "label_prob" (its paper)); steps: optimizer
    steps; batch_size x grad_accum sequences per step; learning_rate with ``schedule`` (constant, cosine or linear
    decay to 0 after ``warmup_steps`` of linear warm-up); AdamW weight_decay; compute_dtype float32 / bfloat16
    (master weights stay float32); remat per block; eval_every K steps (0: never) on the held-out ids;
    checkpoint_every K steps (with a checkpoint directory).
    """

    loss: str = "cakld"
    gamma: float | None = None
    confidence: str = "max_prob"
    gamma_batches: int = 10
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 8e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    compute_dtype: str = "float32"
    remat: bool = True
    eval_every: int = 0
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        if self.loss not in losses.LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; choose one of {', '.join(losses.LOSSES)}")
        if self.confidence not in losses.CONFIDENCE_MODES:
            raise InputError(f"unknown confidence mode {self.confidence!r}; choose one of "
                             f"{', '.join(losses.CONFIDENCE_MODES)}")
        if self.gamma is not None and not 0 <= validation.number(self.gamma, "gamma") <= 1:
            raise InputError(f"gamma must be in [0, 1] (or None: estimated), got {self.gamma}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InputError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        for name in ("steps", "batch_size", "grad_accum", "gamma_batches"):
            validation.integer(getattr(self, name), name)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            validation.integer(getattr(self, name), name, minimum=0)
        if not validation.number(self.learning_rate, "learning_rate") > 0 or \
                validation.number(self.weight_decay, "weight_decay") < 0:
            raise InputError(f"learning_rate must be > 0 and weight_decay >= 0, got {self.learning_rate}, "
                             f"{self.weight_decay}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learning_rate_schedule(cfg: QATConfig) -> optax.Schedule:
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    else:
        main = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    if cfg.warmup_steps == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), main],
                                [cfg.warmup_steps])


def optimizer(cfg: QATConfig) -> optax.GradientTransformation:
    """AdamW with HF Trainer's defaults (β 0.9 / 0.999, ε 1e-8), as BitDistiller trains."""
    return optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)


# ---- the step ----------------------------------------------------------------------------------------------

def _cast_for_compute(params, dtype):
    """Floating leaves to the compute dtype, except fake-quant latent kernels: they are quantized in float32 so
    the forward uses exactly the weights the export packs."""
    if dtype == jnp.float32:
        return params

    def cast(path, x):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        latent = "kernel" in names[-2:]  # (..., "kernel", "value") in an nnx State
        return x if latent or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def step_options(cfg: QATConfig) -> QATConfig:
    """``cfg`` with the fields that do not change the compiled step set to fixed values (one compilation per
    architecture and step-relevant options; the step count matters only to a decaying schedule)."""
    decays = cfg.schedule != "constant" or cfg.warmup_steps
    return dataclasses.replace(cfg, gamma=None, confidence="max_prob", gamma_batches=1, eval_every=0,
                               checkpoint_every=0, seed=0, steps=cfg.steps if decays else 1)


@functools.lru_cache(maxsize=16)
def make_train_step(student_graphdef, teacher_graphdef, cfg: QATConfig) -> Callable:
    """``step(params, frozen, teacher_state, opt_state, ids (A, B, L), gamma) -> (params, opt_state, loss)`` for
    ``cfg`` = `step_options` (cached: repeated runs reuse the compiled step)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    tx = optimizer(cfg)

    def loss_fn(params, frozen, teacher_state, ids, gamma):
        student = nnx.merge(student_graphdef, _cast_for_compute(params, dtype), _cast_for_compute(frozen, dtype))
        inputs, labels = ids[:, :-1], ids[:, 1:]
        logits = student(inputs, remat=cfg.remat)
        teacher_logits = None
        if cfg.loss != "ce":
            teacher = nnx.merge(teacher_graphdef, teacher_state)
            teacher_logits = jax.lax.stop_gradient(teacher(inputs))
        mask = jnp.ones(labels.shape, jnp.float32)
        return losses.distillation_loss(cfg.loss, logits, teacher_logits, labels, mask, gamma)

    @jax.jit
    def step(params, frozen, teacher_state, opt_state, ids, gamma):
        def micro(carry, batch):
            grads, total = carry
            loss, g = jax.value_and_grad(loss_fn)(params, frozen, teacher_state, batch, gamma)
            return (jax.tree.map(jnp.add, grads, g), total + loss), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, total), _ = jax.lax.scan(micro, (zeros, jnp.float32(0)), ids)
        grads = jax.tree.map(lambda g: g / ids.shape[0], grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, total / ids.shape[0]

    return step


# ---- checkpoints -------------------------------------------------------------------------------------------

def run_fingerprint(student: CausalLM, cfg: QATConfig, data: np.ndarray) -> str:
    """What a resumed run must share with the run that wrote the checkpoint: architecture, layout, options other
    than the step counts, and the training data."""
    layout = {p: str(m.train_scheme) for p, m in student.linear_layers().items() if m.train_scheme is not None}
    opts = {k: v for k, v in cfg.to_json().items() if k not in _RESUMABLE_FIELDS}
    blob = json.dumps({"arch": dataclasses.asdict(student.cfg), "layout": layout, "options": opts,
                       "data": hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class TrainingCheckpoints:
    """Orbax training checkpoints under ``directory``: per saved step the parameters and optimizer state, and a
    JSON record (step, data position, γ, fingerprint, history)."""

    def __init__(self, directory: str | Path, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, record: dict) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params,
                                                                                         "opt_state": opt_state}),
                                                         record=ocp.args.JsonSave(record)))
        self.manager.wait_until_finished()

    def restore(self, params, opt_state) -> tuple[Any, Any, dict]:
        ocp = self._ocp
        step = self.manager.latest_step()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                   record=ocp.args.JsonRestore()))
        return out["state"]["params"], out["state"]["opt_state"], dict(out["record"])


# ---- the loop ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    student: CausalLM
    history: list[dict]
    gamma: float
    steps: int
    tokens: int
    seconds: float


def train(student: CausalLM, teacher: CausalLM, data: np.ndarray, cfg: QATConfig, *,
          eval_ids: np.ndarray | None = None, eval_seq_len: int = 256, eval_windows: int = 4,
          checkpoint_dir: str | Path | None = None, resume: bool = False, mesh: Mesh | None = None,
          progress: bool = True) -> TrainResult:
    """Trains ``student`` (fake-quant layers, see `student.make_student`) against ``teacher`` on ``data`` (int32
    sequences (n, L)) for ``cfg.steps`` optimizer steps; returns the trained student and the loss history.

    ``resume``: continue from the latest checkpoint in ``checkpoint_dir`` (same model, layout, options and data,
    else `InputError`); a finished run resumed with more ``steps`` trains on. A non-finite loss stops training
    with `QuantizationError`; the last checkpoint written before it stays as it was.
    """
    cfg.validate()
    data = np.asarray(data, np.int32)
    if data.ndim != 2 or data.shape[1] < 2 or len(data) == 0:
        raise InputError(f"training data must be token ids (sequences, length >= 2), got shape {data.shape}")
    if data.min() < 0 or data.max() >= student.cfg.vocab_size:
        raise InputError(f"training data token ids must lie in [0, {student.cfg.vocab_size})")
    if resume and checkpoint_dir is None:
        raise InputError("resume needs the checkpoint directory of the run to continue")
    if mesh is not None:
        mesh = check_mesh(mesh, need="data")
    graphdef, params, frozen = nnx.split(student, trainable_filter, ...)
    t_graphdef, t_state = nnx.split(teacher)
    if cfg.compute_dtype == "bfloat16":
        t_state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                               t_state)
    tx = optimizer(cfg)
    params = place_fsdp(params, mesh)
    frozen, t_state = place_fsdp(frozen, mesh), place_fsdp(t_state, mesh)
    opt_state = place_fsdp(tx.init(params), mesh)
    fingerprint = run_fingerprint(student, cfg, data)
    if resume and (checkpoint_dir is None or not Path(checkpoint_dir).is_dir()):  # before orbax creates it
        raise InputError(f"nothing to resume: {checkpoint_dir} is not a directory of training checkpoints")
    ckpt = TrainingCheckpoints(checkpoint_dir) if checkpoint_dir is not None else None
    step0, position, history, gamma = 0, 0, [], cfg.gamma
    if resume and ckpt.latest_step() is not None:
        params, opt_state, record = ckpt.restore(params, opt_state)
        if record.get("fingerprint") != fingerprint:
            raise InputError(f"the checkpoint in {checkpoint_dir} belongs to another model, layout, option set or "
                             f"training data; start a new run (another directory) or use the original settings")
        step0, position, history, gamma = record["step"], record["position"], record["history"], record["gamma"]
    elif resume:
        raise InputError(f"nothing to resume: {checkpoint_dir} holds no training checkpoint")
    elif ckpt is not None and ckpt.latest_step() is not None:
        raise InputError(f"{checkpoint_dir} already holds a training run; pass resume to continue it or choose a "
                         f"new directory")
    if gamma is None:
        gamma = _estimate_gamma(teacher, data, cfg) if cfg.loss == "cakld" else 0.5
    step_fn = make_train_step(graphdef, t_graphdef, step_options(cfg))
    stream = data_lib.batches(data, position=position, batch_size=cfg.batch_size, accum=cfg.grad_accum,
                              seed=cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * (data.shape[1] - 1)
    t0 = time.perf_counter()
    bar = tqdm(range(step0, cfg.steps), initial=step0, total=cfg.steps, desc=f"QAT ({cfg.loss})", unit="step",
               disable=not progress)
    last_saved = step0
    t_step = time.perf_counter()
    for step in bar:
        position, ids = next(stream)
        new_params, new_opt, loss = step_fn(params, frozen, t_state, opt_state, place_batch(ids, mesh),
                                            jnp.float32(gamma))
        loss = float(loss)
        if not math.isfinite(loss):
            where = f"; the last checkpoint is step {last_saved} in {ckpt.directory}" if ckpt and last_saved else ""
            raise QuantizationError(f"QAT diverged: the loss is {loss} at step {step + 1}{where}; lower the learning "
                                    f"rate (now {cfg.learning_rate:g}) or use compute_dtype float32")
        params, opt_state = new_params, new_opt
        now = time.perf_counter()
        entry = {"step": step + 1, "loss": round(loss, 6), "seconds": round(now - t_step, 3)}
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / (now - t_step):,.0f}")  # first: compile
        if cfg.eval_every and eval_ids is not None and (step + 1) % cfg.eval_every == 0:
            current = nnx.merge(graphdef, params, frozen)
            entry["eval_perplexity"] = round(perplexity(current, eval_ids,
                                                        seq_len=min(eval_seq_len, current.cfg.max_seq_len),
                                                        max_windows=eval_windows, progress=False)["perplexity"], 4)
        history.append(entry)
        if ckpt is not None and cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0
                                                          or step + 1 == cfg.steps):
            ckpt.save(step + 1, params, opt_state, {"step": step + 1, "position": position, "gamma": gamma,
                                                    "fingerprint": fingerprint, "history": history})
            last_saved = step + 1
        t_step = time.perf_counter()  # step time excludes evaluation and checkpointing
    bar.close()
    trained = nnx.merge(graphdef, jax.device_get(params), jax.device_get(frozen))
    trained.checkpoint_info = student.checkpoint_info
    return TrainResult(student=trained, history=history, gamma=float(gamma), steps=cfg.steps,
                       tokens=tokens_per_step * cfg.steps, seconds=round(time.perf_counter() - t0, 1))


def step_cost(student: CausalLM, teacher: CausalLM, cfg: QATConfig, seq_len: int) -> float:
    """FLOPs of one compiled training step (``grad_accum`` x ``batch_size`` sequences of ``seq_len`` tokens),
    from XLA's cost analysis; nothing runs."""
    graphdef, params, frozen = nnx.split(student, trainable_filter, ...)
    t_graphdef, t_state = nnx.split(teacher)
    step = make_train_step(graphdef, t_graphdef, step_options(cfg))
    opt_state = jax.eval_shape(optimizer(cfg).init, params)
    ids = jax.ShapeDtypeStruct((cfg.grad_accum, cfg.batch_size, seq_len), jnp.int32)
    compiled = step.lower(params, frozen, t_state, opt_state, ids, jnp.float32(0.5)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _estimate_gamma(teacher: CausalLM, data: np.ndarray, cfg: QATConfig) -> float:
    """CAKLD's γ over the first ``gamma_batches`` batches of the stream (the teacher's mean confidence)."""
    graphdef, state = nnx.split(teacher)
    stream = data_lib.batches(data, position=0, batch_size=cfg.batch_size, accum=1, seed=cfg.seed)

    def batches():
        for _ in range(cfg.gamma_batches):
            _, ids = next(stream)
            ids = ids[0]
            yield jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.ones(ids[:, 1:].shape, jnp.float32)

    return losses.teacher_confidence(batches(), lambda ids: _logits(graphdef, state, ids), cfg.confidence)
