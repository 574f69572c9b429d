"""Proximal updates for parameters a method drives to exact zeros (OED's block masks): soft
thresholding, the FISTA step of Beck & Teboulle (2009) in the form GAL/OED use, and a loop
callback that owns the parameters and applies the step after each optimiser step with that
step's own learning rate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdprune.training.callbacks import Callback, LoopState

__all__ = ["soft_threshold", "FistaState", "fista_step", "FistaL1"]


def soft_threshold(x: Tensor, tau: float) -> Tensor:
    """prox of tau*|x|_1: sign(x) * max(|x| - tau, 0)."""
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


@dataclass
class FistaState:
    """FISTA's momentum for one tensor: t_k and the previous iterate m_{k-1}."""

    t: float
    prev: Tensor


def fista_step(m: Tensor, grad: Tensor, state: FistaState, lr: float, lam: float,
               nonneg: bool = True) -> Tensor:
    """One FISTA step (Beck & Teboulle 2009; OED/GAL form): t' = (1 + sqrt(1 + 4t^2)) / 2,
    y = m + (t - 1)/t' (m - m_prev), m' = max(0, soft(y - lr * grad, lr * lam)); updates state."""
    t_next = (1.0 + math.sqrt(1.0 + 4.0 * state.t * state.t)) / 2.0
    y = m + ((state.t - 1.0) / t_next) * (m - state.prev)
    new = soft_threshold(y - lr * grad, lr * lam)
    if nonneg:
        new = new.clamp(min=0.0) + 0.0  # + 0.0: no -0.0 in saved masks
    state.t, state.prev = t_next, m.detach().clone()
    return new


class FistaL1(Callback):
    """Owns ``params`` (kept out of the optimiser) and moves them by FISTA with an L1 prox after
    every optimiser step: the L1 term acts through the prox only, never through the loss. Each
    step uses ``lr_scale`` times that step's learning rate; with ``restart_on_decay`` the momentum
    restarts (t = 1) whenever the learning rate falls to half the rate at the last restart or less
    (every decay of a step schedule; a cosine one restarts at each halving)."""

    def __init__(self, params: Sequence[nn.Parameter], lam: float, lr_scale: float = 1.0,
                 restart_on_decay: bool = True, nonneg: bool = True) -> None:
        if lam < 0 or lr_scale <= 0:
            raise ValueError(f"FistaL1 needs lam >= 0 and lr_scale > 0, got lam={lam}, lr_scale={lr_scale}")
        self.params, self.lam, self.lr_scale = list(params), float(lam), float(lr_scale)
        self.restart_on_decay, self.nonneg = restart_on_decay, nonneg
        self.states = [FistaState(1.0, p.detach().clone()) for p in self.params]
        self.restart_lr: float | None = None
        self.restarts = 0

    def owned_parameters(self) -> list[nn.Parameter]:
        """The proximal parameters: the loop gives them gradients but no optimiser."""
        return self.params

    def on_train_start(self, state: LoopState) -> None:
        """Momentum on the parameters' device (the loop may have moved them)."""
        for s, p in zip(self.states, self.params):
            s.prev = s.prev.to(p.device)

    def _maybe_restart(self, lr: float) -> None:
        if self.restart_lr is None:
            self.restart_lr = lr
        elif self.restart_on_decay and lr <= 0.5 * self.restart_lr:
            for s, p in zip(self.states, self.params):
                s.t, s.prev = 1.0, p.detach().clone()
            self.restart_lr, self.restarts = lr, self.restarts + 1

    @torch.no_grad()
    def on_optimizer_step(self, state: LoopState) -> None:
        """The prox step with the learning rate the weights just used."""
        self._maybe_restart(state.lr)
        lr = self.lr_scale * state.lr
        for p, s in zip(self.params, self.states):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.copy_(fista_step(p.detach(), grad, s, lr, self.lam, self.nonneg))
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"t": [s.t for s in self.states], "prev": [s.prev.clone() for s in self.states],
                "restart_lr": self.restart_lr, "restarts": self.restarts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, t, prev, p in zip(self.states, state["t"], state["prev"], self.params):
            s.t, s.prev = float(t), prev.to(p.device).clone()
        self.restart_lr, self.restarts = state["restart_lr"], int(state["restarts"])
