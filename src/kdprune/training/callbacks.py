"""Hooks a method plugs into the training loop (gates, masks, schedules), with resumable state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LoopState:
    """What callbacks see: the (unwrapped) model, the optimizer and the position in the run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    step: int  # global optimizer steps done so far
    steps_per_epoch: int
    epochs: int


class Callback:
    """Base class: override what you need. State is saved in every checkpoint for exact resume."""

    def on_train_start(self, state: LoopState) -> None:
        """Called once, after the optimizer exists and any checkpoint has been restored."""

    def on_after_backward(self, state: LoopState) -> None:
        """Called after loss.backward(), before the optimizer step (e.g. to add regularisation grads)."""

    def on_step_end(self, state: LoopState) -> None:
        """Called after each optimizer step (state.step already counts it)."""

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        """Called after each epoch's evaluation, before the checkpoint is written."""

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class StopTraining(Exception):
    """Raised by a callback to end the run early; the last checkpoint stays resumable."""
