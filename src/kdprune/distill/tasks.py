"""Training "tasks": how a trainer turns (model, x, y) into student logits and loss terms.

A task returns ``(logits, terms)``; the loss to optimise is ``sum(terms.values())``. Terms are
already weighted, so a trainer can log each of them and sum them without knowing the method.
Tasks that hold networks (teachers, adapters) list them in ``modules()`` so the trainer can move
them to the device; what a task trains besides the student it lists in ``trainable_modules()``
(the full protocol is in :mod:`kdprune.training.runner`). Teachers are frozen
(:class:`FrozenTeacher`) and are never wrapped in DDP. ``kp.train`` logs every term per epoch
(``train_ce``, ``train_kd``, ...) in ``metrics.jsonl`` and shows them in the progress bar.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdprune.distill.features import FeatureTap, HintLoss
from kdprune.distill.losses import MeanKL, TeacherMode, _check_temperature, kd_loss, multi_teacher_kd_loss
from kdprune.distill.teachers import FrozenTeacher, is_frozen_teacher_module, unwrap_teacher
from kdprune.registry import check_choice

__all__ = ["Task", "CETask", "KDTask", "HintKDTask"]


@runtime_checkable
class Task(Protocol):
    """Maps (model, x, y) to (student logits, named loss terms summing to the loss)."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...

    def modules(self) -> list[nn.Module]: ...


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def _freeze(teacher: nn.Module) -> nn.Module:
    # Ensembles and FrozenTeachers are already frozen; anything else gets wrapped (in place).
    return teacher if is_frozen_teacher_module(teacher) else FrozenTeacher(teacher)


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    # Hooks must go on the inner module so that submodule names carry no "module." prefix.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


@dataclass(eq=False)
class CETask:
    """Plain supervised cross-entropy (with optional label smoothing, Szegedy et al. 2016)."""

    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (logits, {"ce": CE(logits, y)})."""
        logits = model(x)
        return logits, {"ce": F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)}

    def modules(self) -> list[nn.Module]:
        """No networks besides the student."""
        return []


@dataclass(eq=False)
class KDTask:
    """Hinton et al. 2015 distillation: terms {"ce": (1-alpha)*CE, "kd": alpha*T^2*KL}.

    ``teacher`` is wrapped in :class:`FrozenTeacher` (frozen in place) unless it already is a
    frozen teacher; an :class:`EnsembleTeacher` (any teacher returning a list of logits) is
    distilled with :func:`multi_teacher_kd_loss` using ``teacher_mode``.
    """

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.9
    label_smoothing: float = 0.0
    teacher_mode: TeacherMode = MeanKL()

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        _check_alpha(self.alpha)
        check_choice(self.teacher_mode, TeacherMode, "teacher_mode")
        self.teacher = _freeze(self.teacher)

    def _kd(self, logits: Tensor, x: Tensor) -> Tensor:
        with torch.no_grad():
            t_out = self.teacher(x)
        if isinstance(t_out, (list, tuple)):
            return multi_teacher_kd_loss(logits, list(t_out), self.temperature, self.teacher_mode)
        return kd_loss(logits, t_out, self.temperature)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (logits, {"ce": (1-alpha)*CE, "kd": alpha*KD})."""
        logits = model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        kd = self._kd(logits, x)
        return logits, {"ce": (1.0 - self.alpha) * ce, "kd": self.alpha * kd}

    def modules(self) -> list[nn.Module]:
        """The (frozen) teacher, to be moved to the device; never DDP-wrap it."""
        return [self.teacher]


@dataclass(eq=False)
class HintKDTask:
    """KD (Hinton et al. 2015) plus FitNets hints (Romero et al. 2015): adds "hint": beta*MSE.

    ``student_layers[i]`` is matched to ``teacher_layers[i]`` (names for ``get_submodule`` on the
    plain student / teacher network). ``hint`` holds trainable 1x1 adapters, listed by
    ``trainable_modules()``: ``kp.train`` optimises them, checkpoints them, and synchronises
    them under DDP together with the student. Pruning the student changes its channels, so
    build a new task (new adapters) after each pruning step. Only single (non-ensemble) teachers.
    """

    teacher: nn.Module
    student_layers: Sequence[str]
    teacher_layers: Sequence[str]
    hint: HintLoss
    beta: float = 1.0
    temperature: float = 4.0
    alpha: float = 0.9
    label_smoothing: float = 0.0
    _kd_task: KDTask = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.student_layers) != len(self.teacher_layers):
            raise ValueError("student_layers and teacher_layers must pair up one to one")
        if len(self.hint.adapters) != len(self.student_layers):
            raise ValueError(f"hint has {len(self.hint.adapters)} adapters for {len(self.student_layers)} layer pairs")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        self._kd_task = KDTask(self.teacher, self.temperature, self.alpha, self.label_smoothing)
        self.teacher = self._kd_task.teacher
        if not isinstance(self.teacher, FrozenTeacher):
            raise TypeError("HintKDTask supports a single teacher, not an ensemble")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (logits, {"ce", "kd", "hint"}); taps are attached only for this call."""
        with FeatureTap(_unwrap_ddp(model), self.student_layers) as s_tap:
            logits = model(x)
            s_feats = s_tap.as_list()
        with FeatureTap(unwrap_teacher(self.teacher), self.teacher_layers, detach=True) as t_tap:
            with torch.no_grad():
                t_logits = self.teacher(x)
            t_feats = t_tap.as_list()
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        kd = kd_loss(logits, t_logits, self.temperature)
        terms = {
            "ce": (1.0 - self.alpha) * ce,
            "kd": self.alpha * kd,
            "hint": self.beta * self.hint(s_feats, t_feats),
        }
        return logits, terms

    def modules(self) -> list[nn.Module]:
        """Teacher (frozen, no DDP) and the hint adapters (trainable)."""
        return [self.teacher, self.hint]

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The hint adapters: trained, checkpointed and DDP-synchronised with the student."""
        return {"hint": self.hint}
