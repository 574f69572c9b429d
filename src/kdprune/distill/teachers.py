"""Frozen teachers for knowledge distillation (Hinton et al. 2015), single or ensembles.

A teacher holds no trainable parameters, so it must never be wrapped in
``DistributedDataParallel`` (DDP refuses modules without grad-requiring parameters, and there
is nothing to synchronise anyway). Every teacher class here carries the class attribute
``is_frozen_teacher = True``; trainers should test it with :func:`is_frozen_teacher_module`
and simply move such modules to the device instead of wrapping them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdprune.distill.losses import _check_temperature, ensemble_probs

__all__ = [
    "FrozenTeacher",
    "EnsembleTeacher",
    "is_frozen_teacher_module",
    "unwrap_teacher",
]


def is_frozen_teacher_module(module: object) -> bool:
    """True for teachers built here (marker ``is_frozen_teacher``); trainers skip DDP for them."""
    return bool(getattr(module, "is_frozen_teacher", False))


class FrozenTeacher(nn.Module):
    """A teacher network frozen for distillation (Hinton et al. 2015): eval mode, no grads.

    The wrapped model is frozen *in place* (``requires_grad_(False)``, ``eval()``). ``train()``
    is overridden so that ``parent.train()`` never switches BatchNorm/Dropout of the teacher
    back to training behaviour, and ``forward`` runs under ``torch.no_grad()`` so no graph is
    built even if someone re-enables ``requires_grad`` on its parameters.
    """

    is_frozen_teacher = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"FrozenTeacher wraps an nn.Module, got {type(model).__name__}")
        if is_frozen_teacher_module(model):
            # Re-wrapping would only add a level of indirection; keep the inner model.
            model = unwrap_teacher(model)
        self.model = model
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Ignore ``mode``: a teacher always stays in eval mode."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher under ``torch.inference_mode`` (no graph, no version counters)."""
        with torch.inference_mode():
            out = self.model(*args, **kwargs)
        # Inference tensors cannot be saved for backward, and the KD loss combines the teacher's
        # outputs with the student's graph: a clone outside inference mode is a normal tensor.
        return as_normal(out)


def as_normal(out: Any) -> Any:
    """Inference tensors in ``out`` (a tensor or nested list/tuple/dict) cloned into normal ones,
    so a loss may combine them with a graph; a no-op inside inference mode."""
    if isinstance(out, Tensor):
        return out.clone() if out.is_inference() and not torch.is_inference_mode_enabled() else out
    if isinstance(out, (list, tuple)):
        return type(out)(as_normal(o) for o in out)
    if isinstance(out, dict):
        return {k: as_normal(v) for k, v in out.items()}
    return out


def unwrap_teacher(module: nn.Module) -> nn.Module:
    """Return the plain network inside a :class:`FrozenTeacher` (else ``module`` itself)."""
    return module.model if isinstance(module, FrozenTeacher) else module


class EnsembleTeacher(nn.Module):
    """Several frozen teachers, possibly of different architectures (ensemble KD, Hinton 2015).

    ``forward(x)`` returns one logits tensor per teacher; :func:`multi_teacher_kd_loss` consumes
    that list. ``mean_logits`` / ``mean_probs`` give ensemble predictions for evaluation.
    """

    is_frozen_teacher = True

    def __init__(self, teachers: Sequence[nn.Module]) -> None:
        super().__init__()
        if isinstance(teachers, nn.Module) or len(teachers) == 0:
            raise ValueError("EnsembleTeacher needs a non-empty sequence of teacher modules")
        wrapped = [t if isinstance(t, FrozenTeacher) else FrozenTeacher(t) for t in teachers]
        self.teachers = nn.ModuleList(wrapped)
        super().train(False)

    def __len__(self) -> int:
        return len(self.teachers)

    def train(self, mode: bool = True) -> "EnsembleTeacher":
        """Ignore ``mode``: teachers always stay in eval mode."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every teacher, in construction order, computed without grad."""
        outs = [t(x) for t in self.teachers]
        for i, o in enumerate(outs):
            if not isinstance(o, Tensor):
                raise TypeError(f"teacher {i} returned {type(o).__name__}, expected a logits Tensor")
        return outs

    def mean_logits(self, x: Tensor) -> Tensor:
        """Mean of the teachers' logits (argmax of it is the usual ensemble prediction)."""
        outs = self(x)
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise ValueError(f"teachers produced logits of different shapes: {sorted(shapes)}")
        return torch.stack(outs, dim=0).mean(dim=0)

    def mean_probs(self, x: Tensor, temperature: float = 1.0) -> Tensor:
        """Mean of the teachers' softmax(z / T) distributions (probability averaging)."""
        _check_temperature(temperature)
        return ensemble_probs(self(x), temperature)
