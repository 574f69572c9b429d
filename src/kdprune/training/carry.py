"""Optimizer state carried across a structural edit between two training stages: momentum and
Adam moments follow their parameters by name, sliced to the entries that survived the edit, so
that cutting zero-gated channels between stages changes the cost of training, not the training."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from kdprune.training.callbacks import Callback, LoopState

NamedState = dict[str, dict[str, Any]]  # parameter name -> its optimizer state (tensors cloned)


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> NamedState:
    """The optimizer's per-parameter state keyed by the model's parameter names (copies)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in optimizer.state.items() if id(p) in names}


def _select(t: torch.Tensor, idx: Sequence[torch.Tensor]) -> torch.Tensor:
    for dim, i in enumerate(idx[:t.dim()]):
        t = t.index_select(dim, i.to(t.device))
    return t


def slice_state(state: NamedState, kept: Mapping[str, Sequence[torch.Tensor]]) -> NamedState:
    """Each parameter's state tensors (not scalars such as Adam's step) cut to the indices of dims
    0 and 1 in ``kept`` (a parameter absent from ``kept`` keeps its state whole)."""
    return {name: {k: _select(v, kept[name]) if torch.is_tensor(v) and v.dim() and name in kept else v
                   for k, v in s.items()} for name, s in state.items()}


def load_named_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: NamedState) -> int:
    """Put ``state`` into ``optimizer`` for the model's parameters of the same name and shape;
    returns how many parameters got state (the others start fresh, as in a new optimizer)."""
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    n = 0
    for name, p in model.named_parameters():
        s = state.get(name)
        if s is None or id(p) not in params:
            continue
        if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in s.values()):
            continue
        optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in s.items()}
        n += 1
    return n


class CarryOptimizerState(Callback):
    """Hands the optimizer state a stage ended with to the next stage's fresh optimizer: call
    ``hold()`` after a stage's ``train`` returns (before editing the model), ``remap(kept)``
    after the edit; a stage resumed from its own checkpoint keeps the checkpoint's state."""

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._held: NamedState | None = None
        self.carried: list[int] = []  # parameters that got state, per stage that started fresh

    def on_train_start(self, state: LoopState) -> None:
        self._model, self._optimizer = state.model, state.optimizer
        if self._held is not None and state.step == 0:
            self.carried.append(load_named_state(state.model, state.optimizer, self._held))
        self._held = None

    def hold(self) -> None:
        """Take the last stage's optimizer state by parameter name (before the model changes)."""
        if self._model is None or self._optimizer is None:
            raise RuntimeError("CarryOptimizerState.hold: no stage has trained with this callback yet")
        self._held = named_optimizer_state(self._model, self._optimizer)

    def remap(self, kept: Mapping[str, Sequence[torch.Tensor]]) -> None:
        """Cut the held state to the entries that survived the edit (see ``slice_state``)."""
        if self._held is not None:
            self._held = slice_state(self._held, kept)
