"""Hooks a method plugs into the training loop (gates, masks, proximal steps), with resumable state.

Order within one optimiser step::

    task forward -> loss.backward()  -> on_after_backward  (gradients ready, before clipping)
    optimizer.step(), state.step += 1 -> on_optimizer_step (parameters updated; state.lr is the
                                                            learning rate this update used)
    scheduler.step()                 -> on_step_end        (state.lr is still this step's)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class LoopState:
    """What callbacks see: the (unwrapped) model, the optimizer, the position in the run and,
    during a step, its batch, the student's outputs, the named loss terms and the learning rate."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    step: int  # global optimizer steps done so far
    steps_per_epoch: int
    epochs: int
    task: Any = None
    x: Tensor | None = None
    y: Tensor | None = None
    outputs: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    lr: float = 0.0  # the learning rate of the current (or last) optimizer step


class Callback:
    """Base class: override what you need. State is saved in every checkpoint for exact resume."""

    def owned_parameters(self) -> list[nn.Parameter]:
        """Parameters this callback updates itself (e.g. FISTA masks): kept out of the optimizer.

        They still receive gradients (averaged over ranks under DDP); read them in
        ``on_after_backward`` and update the values in ``on_optimizer_step``."""
        return []

    def on_train_start(self, state: LoopState) -> None:
        """Called once, after the optimizer exists and any checkpoint has been restored."""

    def on_after_backward(self, state: LoopState) -> None:
        """Called after loss.backward(), before the optimizer step (e.g. to add regularisation grads)."""

    def on_optimizer_step(self, state: LoopState) -> None:
        """Called after optimizer.step() and before the scheduler step (e.g. a proximal step:
        ``state.lr`` is the learning rate of the update just made; state.step already counts it)."""

    def on_step_end(self, state: LoopState) -> None:
        """Called after each optimizer and scheduler step (state.step already counts it)."""

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        """Called after each epoch's evaluation, before the checkpoint is written."""

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class StopTraining(Exception):
    """Raised by a callback to end the run early; the last checkpoint stays resumable."""
