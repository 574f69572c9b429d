"""Distillation losses: soft-target KD (Hinton et al. 2015) and its multi-teacher variants.

Conventions used throughout:

* logits have shape ``(batch, classes)``; the class dimension is the last one;
* the KL divergence is reduced with ``batchmean`` (sum over classes, mean over the batch),
  which is the mathematically correct KL per sample, unlike an element-wise mean;
* the soft loss is multiplied by ``T**2`` so that its gradient magnitude does not shrink as
  the temperature grows (Hinton et al. 2015, section 2), which keeps ``alpha`` meaningful
  across temperatures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kdprune.registry import check_choice, choice

__all__ = [
    "TeacherMode",
    "MeanKL",
    "MeanProb",
    "soft_targets",
    "ensemble_probs",
    "kd_loss",
    "multi_teacher_kd_loss",
    "kd_objective",
]


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, classes), got {tuple(logits.shape)}")


def _log_soft(logits: Tensor, temperature: float) -> Tensor:
    # Upcast fp16/bf16 (autocast) logits to float32 so the softmax cannot under/overflow;
    # float32/float64 inputs keep their precision.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits / temperature, dim=-1)


def _kl_from_log_probs(log_p_target: Tensor, log_p_student: Tensor) -> Tensor:
    """batchmean KL(p_target || p_student) from log-probabilities (Kullback & Leibler 1951)."""
    # kl_div with log_target=True computes exp(t) * (t - s) without forming log(0) = -inf * 0.
    return F.kl_div(log_p_student, log_p_target, reduction="batchmean", log_target=True)


def soft_targets(teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Teacher's softened distribution softmax(z_t / T) (Hinton et al. 2015)."""
    _check_temperature(temperature)
    _check_logits("teacher_logits", teacher_logits)
    return _log_soft(teacher_logits, temperature).exp()


def _ensemble_log_probs(teacher_logits: Sequence[Tensor], temperature: float) -> Tensor:
    # log(mean_i p_i) = logsumexp_i(log p_i) - log K: stable even when some p_i underflow.
    stacked = torch.stack([_log_soft(t, temperature) for t in teacher_logits], dim=0)
    return torch.logsumexp(stacked, dim=0) - math.log(len(teacher_logits))


def _check_teachers(student_logits: Tensor, teacher_logits: Sequence[Tensor]) -> None:
    if isinstance(teacher_logits, Tensor):
        raise TypeError("teacher_logits must be a sequence of Tensors (one per teacher), not a Tensor")
    if len(teacher_logits) == 0:
        raise ValueError("teacher_logits is empty: at least one teacher is required")
    for i, t in enumerate(teacher_logits):
        _check_logits(f"teacher_logits[{i}]", t)
        if t.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits[{i}] shape {tuple(t.shape)} != student shape {tuple(student_logits.shape)}"
            )


def ensemble_probs(teacher_logits: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Mean of the teachers' softened distributions, mean_i softmax(z_i / T) (ensemble averaging)."""
    _check_temperature(temperature)
    if isinstance(teacher_logits, Tensor) or len(teacher_logits) == 0:
        raise ValueError("teacher_logits must be a non-empty sequence of Tensors")
    for i, t in enumerate(teacher_logits):
        _check_logits(f"teacher_logits[{i}]", t)
        if t.shape != teacher_logits[0].shape:
            raise ValueError(f"teacher_logits[{i}] shape {tuple(t.shape)} != {tuple(teacher_logits[0].shape)}")
    return _ensemble_log_probs(teacher_logits, temperature).exp()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target loss T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batchmean (Hinton et al. 2015).

    The gradient w.r.t. the student logits is ``T * (p_s - p_t) / batch``. Gradients flow only
    into ``student_logits`` when the teacher logits were produced under ``no_grad`` / detached;
    this function also detaches them so a teacher is never trained through this loss.
    """
    _check_temperature(temperature)
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    log_p_s = _log_soft(student_logits, temperature)
    log_p_t = _log_soft(teacher_logits.detach(), temperature)
    return temperature**2 * _kl_from_log_probs(log_p_t, log_p_s)


@choice("mean_kl")
@dataclass(frozen=True)
class MeanKL:
    """Ensemble reduction: mean over teachers of ``kd_loss(student, teacher_i, T)``."""

    def loss(self, student_logits: Tensor, teacher_logits: Sequence[Tensor], temperature: float) -> Tensor:
        """The multi-teacher soft loss (inputs already checked)."""
        losses = [kd_loss(student_logits, t, temperature) for t in teacher_logits]
        return torch.stack(losses).mean()


@choice("mean_prob")
@dataclass(frozen=True)
class MeanProb:
    """Ensemble reduction: ``T^2 * KL(mean_i p_i || p_s)``, distil the averaged soft targets."""

    def loss(self, student_logits: Tensor, teacher_logits: Sequence[Tensor], temperature: float) -> Tensor:
        """The multi-teacher soft loss (inputs already checked)."""
        log_p_s = _log_soft(student_logits, temperature)
        log_p_bar = _ensemble_log_probs([t.detach() for t in teacher_logits], temperature)
        return temperature**2 * _kl_from_log_probs(log_p_bar, log_p_s)


TeacherMode = Union[MeanKL, MeanProb]


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits: Sequence[Tensor],
    temperature: float = 4.0,
    mode: TeacherMode = MeanKL(),
) -> Tensor:
    """Multi-teacher KD (You et al. 2017 / Hinton et al. 2015 ensembles), two reductions.

    ``MeanKL()``: mean over teachers of ``kd_loss(student, teacher_i, T)``.
    ``MeanProb()``: ``T^2 * KL(mean_i p_i || p_s)``, i.e. distil the averaged soft targets.
    By Jensen, ``MeanProb <= MeanKL``; they coincide when all teachers agree.
    """
    _check_temperature(temperature)
    _check_logits("student_logits", student_logits)
    _check_teachers(student_logits, teacher_logits)
    check_choice(mode, TeacherMode, "multi-teacher mode")
    return mode.loss(student_logits, teacher_logits, temperature)


def kd_objective(ce: Tensor, kd: Tensor, alpha: float) -> Tensor:
    """Hinton et al. 2015 mix (1 - alpha) * CE + alpha * KD; alpha is the weight of the KD term.

    ``alpha = 0`` is plain supervised training, ``alpha = 1`` is pure distillation. ``kd`` is
    expected to already carry the ``T^2`` factor (as returned by :func:`kd_loss`).
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return (1.0 - alpha) * ce + alpha * kd
