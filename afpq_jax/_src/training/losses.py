"""Distillation losses for QAT (BitDistiller): CAKLD and the usual alternatives, per token, masked mean.

Every loss takes student and teacher logits ``(B, L, V)`` (any float dtype; computed in float32), the next-token
labels ``(B, L)`` and a mask ``(B, L)`` (1 where the position is trained on), and returns the masked mean over
tokens of a per-token loss:

  forward_kl  KL(P_t ‖ P_s) = Σ_v P_t (log P_t − log P_s)        (mean-seeking)
  reverse_kl  KL(P_s ‖ P_t) = Σ_v P_s (log P_s − log P_t)        (mode-seeking)
  cakld       γ · KL(P_s ‖ P_t) + (1 − γ) · KL(P_t ‖ P_s)        (BitDistiller's confidence-aware KL)
  jsd         ½ KL(P_t ‖ M) + ½ KL(P_s ‖ M),  M = ½ (P_t + P_s)
  ce          −log P_s(label)                                   (plain next-token cross-entropy; no teacher)

γ is the teacher's confidence, estimated once before training by `teacher_confidence`: BitDistiller's code uses
the mean over tokens of the teacher's largest probability (``"max_prob"``, our default); its paper describes the
mean probability the teacher gives the data's next token (``"label_prob"``). BitDistiller sums over tokens and
averages over sequences; the masked mean here differs from that by a constant factor (the tokens per sequence),
i.e. only in the effective learning rate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from afpq_jax._src.errors import InputError

LOSSES = ("cakld", "forward_kl", "reverse_kl", "jsd", "ce")
CONFIDENCE_MODES = ("max_prob", "label_prob")


def _masked_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(P ‖ Q) per token from log-probabilities (terms with P = 0 contribute 0)."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def per_token_loss(name: str, student_logits: jax.Array, teacher_logits: jax.Array | None, labels: jax.Array,
                   gamma: float | jax.Array = 0.5) -> jax.Array:
    """The per-token loss ``(B, L)`` of ``name`` (see the module doc)."""
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    if name == "ce":
        return -jnp.take_along_axis(log_s, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    if name == "forward_kl":
        return _kl(log_t, log_s)
    if name == "reverse_kl":
        return _kl(log_s, log_t)
    if name == "cakld":
        return gamma * _kl(log_s, log_t) + (1.0 - gamma) * _kl(log_t, log_s)
    if name == "jsd":
        log_m = jnp.logaddexp(log_s, log_t) - jnp.log(2.0)
        return 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)
    raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def distillation_loss(name: str, student_logits: jax.Array, teacher_logits: jax.Array | None, labels: jax.Array,
                      mask: jax.Array, gamma: float | jax.Array = 0.5) -> jax.Array:
    """Masked mean over tokens of `per_token_loss` (a float32 scalar)."""
    return _masked_mean(per_token_loss(name, student_logits, teacher_logits, labels, gamma), mask)


def confidence_sums(teacher_logits: jax.Array, labels: jax.Array, mask: jax.Array, mode: str = "max_prob"
                    ) -> tuple[jax.Array, jax.Array]:
    """(Σ confidence over masked tokens, number of masked tokens) of one batch, for `teacher_confidence`."""
    probs = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
    if mode == "max_prob":
        conf = jnp.max(probs, axis=-1)
    elif mode == "label_prob":
        conf = jnp.take_along_axis(probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    else:
        raise InputError(f"unknown confidence mode {mode!r}; choose one of {', '.join(CONFIDENCE_MODES)}")
    m = mask.astype(jnp.float32)
    return jnp.sum(conf * m), jnp.sum(m)


def teacher_confidence(batches, teacher: Callable[[jax.Array], jax.Array], mode: str = "max_prob") -> float:
    """γ for CAKLD: the teacher's mean confidence over the tokens of ``batches`` (iterable of (ids, labels,
    mask)); ``teacher(ids)`` returns its logits."""
    total = count = 0.0
    for ids, labels, mask in batches:
        s, n = confidence_sums(teacher(ids), labels, mask, mode)
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise InputError("no tokens to estimate the teacher's confidence on (all masks are zero)")
    return total / count
