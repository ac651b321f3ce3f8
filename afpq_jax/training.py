"""Quantization-aware training building blocks (BitDistiller), for training loops of your own; `afpq_jax.train_qat`
composes them.

  make_student, export_student — fake-quant student with the clipping init; its packed export.
  train, TrainResult, step_cost — the optax loop (resumable, shardable; configured by `afpq_jax.QATConfig`) and
    its compiled step's FLOPs.
  distillation_loss, per_token_loss, teacher_confidence, LOSSES — CAKLD and the other losses.
  self_generated — teacher-written training data (cached; `afpq_jax.SelfGeneratedData` describes it).
"""

from afpq_jax._src.training.data import self_generated
from afpq_jax._src.training.losses import LOSSES, distillation_loss, per_token_loss, teacher_confidence
from afpq_jax._src.training.student import export_student, make_student
from afpq_jax._src.training.trainer import TrainResult, step_cost, train

__all__ = ["LOSSES", "TrainResult", "distillation_loss", "export_student",
           "make_student", "per_token_loss", "self_generated", "step_cost", "teacher_confidence", "train"]
