"""The student and a task's own trainable modules as one module, so that one DDP wrapper (one
bucketed all-reduce) synchronises everything trained, and the checkpoint holds all of it.

The task protocol the loop reads (every method is optional except ``__call__``):

- ``task(model, x, y) -> (logits, {name: weighted loss term})``;
- ``modules()``: every network the task holds (teachers included), moved to the device;
- ``trainable_modules() -> {name: module}``: what the task trains besides the student (hint
  adapters, replicas, a teacher head); optimised, checkpointed, switched between train/eval and
  DDP-synchronised with the student;
- ``owned_parameters()``: parameters the task updates itself, kept out of the optimizer;
- ``eval_models(model) -> {name: module}``: what ``evaluate`` scores each epoch; ``""`` is the
  main score (``val_top1``), any other name ``n`` is logged as ``val_n_top1`` etc.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["TaskModule", "task_trainable_modules", "task_owned_parameters", "task_eval_models", "wrap"]


def task_trainable_modules(task: Any) -> dict[str, nn.Module]:
    """The task's own trainable modules by name (empty when it has none)."""
    fn = getattr(task, "trainable_modules", None)
    mods = dict(fn()) if callable(fn) else {}
    for name, m in mods.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"{type(task).__name__}.trainable_modules()[{name!r}] is a "
                            f"{type(m).__name__}, expected an nn.Module")
    return mods


def task_owned_parameters(task: Any) -> list[nn.Parameter]:
    """Parameters the task updates itself (empty when it has none)."""
    fn = getattr(task, "owned_parameters", None)
    return list(fn()) if callable(fn) else []


def task_eval_models(task: Any, model: nn.Module) -> dict[str, nn.Module]:
    """What to score at evaluation: the task's choice, else just the student."""
    fn = getattr(task, "eval_models", None)
    models = dict(fn(model)) if callable(fn) else {"": model}
    if "" not in models:
        raise ValueError(f"{type(task).__name__}.eval_models() must include the main model under ''")
    return models


class TaskModule(nn.Module):
    """``forward(x, y)`` runs the task on the student; submodules: ``model`` and ``extras``."""

    def __init__(self, model: nn.Module, task: Any, call: Callable[..., Tensor] | None = None) -> None:
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(task_trainable_modules(task))
        # Plain attributes, not submodules: the task may hold frozen teachers that DDP must not
        # see, and `call` may be a compiled view of `model`.
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "call", call if call is not None else model)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One task evaluation: (student logits, named loss terms)."""
        return self.task(self.call, x, y)


def wrap(runner: TaskModule, device: torch.device, distributed: bool) -> nn.Module:
    """DDP over the whole bundle when distributed (one bucketed gradient all-reduce)."""
    if not distributed:
        return runner
    return DDP(runner, device_ids=[device.index] if device.type == "cuda" else None)
