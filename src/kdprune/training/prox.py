"""Proximal updates for parameters a method drives to exact zeros: soft thresholding, the FISTA
step of Beck & Teboulle (2009) in the form GAL/OED use and a loop callback that owns OED's block
masks; the group-lasso prox over coupled parameter slices (EDP's coefficient columns and rows).
Each callback applies its step after the optimiser step with that step's own learning rate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdprune.training.callbacks import Callback, LoopState

__all__ = ["soft_threshold", "FistaState", "fista_step", "FistaL1", "group_soft_threshold", "GroupSlices",
           "GroupLassoProx"]


def soft_threshold(x: Tensor, tau: float | Tensor) -> Tensor:
    """prox of tau*|x|_1: sign(x) * max(|x| - tau, 0) (tau a scalar or one per element)."""
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


@dataclass
class FistaState:
    """FISTA's momentum for one tensor: t_k and the previous iterate m_{k-1}."""

    t: float
    prev: Tensor


def fista_step(m: Tensor, grad: Tensor, state: FistaState, lr: float, lam: float | Tensor,
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
        self.params, self.lr_scale = list(params), float(lr_scale)
        self.lams: list[float | Tensor] = [float(lam)] * len(self.params)
        self.restart_on_decay, self.nonneg = restart_on_decay, nonneg
        self.states = [FistaState(1.0, p.detach().clone()) for p in self.params]
        self.restart_lr: float | None = None
        self.restarts = 0

    def set_lam(self, lam: float | Tensor, index: int = 0) -> None:
        """Replace the L1 weight of parameter ``index`` (a scalar or one per element, e.g. 0 for
        entries a method has stopped shrinking); saved with the state for exact resume."""
        if isinstance(lam, Tensor):
            if lam.shape != self.params[index].shape or bool((lam < 0).any()):
                raise ValueError(f"per-element lam must be >= 0 with shape {tuple(self.params[index].shape)}")
            lam = lam.detach().clone().to(self.params[index].device)
        elif lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lams[index] = lam

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
        for p, s, lam in zip(self.params, self.states, self.lams):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.copy_(fista_step(p.detach(), grad, s, lr, lam, self.nonneg))
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"t": [s.t for s in self.states], "prev": [s.prev.clone() for s in self.states],
                "restart_lr": self.restart_lr, "restarts": self.restarts,
                "lam": [v.clone() if isinstance(v, Tensor) else v for v in self.lams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, t, prev, p in zip(self.states, state["t"], state["prev"], self.params):
            s.t, s.prev = float(t), prev.to(p.device).clone()
        self.restart_lr, self.restarts = state["restart_lr"], int(state["restarts"])
        for i, lam in enumerate(state.get("lam", self.lams)):  # checkpoints before per-element lam: unchanged
            self.set_lam(lam, i)


def group_soft_threshold(v: Tensor, tau: float) -> Tensor:
    """prox of tau * ||v||_2 (group lasso, Yuan & Lin 2006): v * max(0, 1 - tau / ||v||_2)."""
    norm = v.norm()
    return v * torch.clamp(1.0 - tau / norm.clamp_min(1e-30), min=0.0)


@dataclass(frozen=True)
class GroupSlices:
    """A family of L2 groups over slices of parameters: group g is the union over members k of
    ``params[k]`` at index ``index[k][g]`` along dim ``dims[k]`` (one coupled channel per member)."""

    params: tuple[nn.Parameter, ...]
    dims: tuple[int, ...]
    index: tuple[Tensor, ...]  # per member: local channel of each group (long, same length)
    lam: float

    def norms(self) -> Tensor:
        """||group g||_2 for every group."""
        # (a 1-D parameter, a BatchNorm's gamma, has nothing to sum: sum(dim=[]) would sum it all)
        sq = [(p.detach().pow(2).sum(dim=[d for d in range(p.dim()) if d != dim]) if p.dim() > 1
               else p.detach().pow(2))[idx] for p, dim, idx in zip(self.params, self.dims, self.index)]
        return torch.stack(sq).sum(0).sqrt()

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """Every group g scaled by max(0, 1 - lr * lam / ||g||_2) in place (exact zeros below it)."""
        scale = torch.clamp(1.0 - lr * self.lam / self.norms().clamp_min(1e-30), min=0.0)
        for p, dim, idx in zip(self.params, self.dims, self.index):
            full = torch.ones(p.shape[dim], dtype=p.dtype, device=p.device)
            full[idx.to(p.device)] = scale.to(p.dtype).to(p.device)
            shape = [1] * p.dim()
            shape[dim] = -1
            p.mul_(full.view(shape))


class GroupLassoProx(Callback):
    """After every optimiser step, the group-lasso prox on each family with that step's learning
    rate (times ``lr_scale``): the penalty acts through the prox only. Stateless, so resume is exact."""

    def __init__(self, families: Sequence[GroupSlices], lr_scale: float = 1.0) -> None:
        if lr_scale <= 0 or any(f.lam < 0 for f in families):
            raise ValueError("GroupLassoProx needs lr_scale > 0 and every lam >= 0")
        self.families, self.lr_scale = list(families), float(lr_scale)

    def on_optimizer_step(self, state: LoopState) -> None:
        """The prox with the learning rate the weights just used."""
        for f in self.families:
            if f.lam > 0:
                f.prox_(self.lr_scale * state.lr)
