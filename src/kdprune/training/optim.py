"""Build optimizers and per-batch LR schedules from their typed configs (dispatch by type)."""
from __future__ import annotations

import math
import warnings
from functools import singledispatch
from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from kdprune.training.config import SGD, Adam, AdamW, Constant, Cosine, OneCycle, Step


@singledispatch
def build_optimizer(cfg: object, params: Iterable) -> torch.optim.Optimizer:
    """Build the optimizer described by `cfg`."""
    raise TypeError(f"no optimizer for config type {type(cfg).__name__}")


@build_optimizer.register
def _(cfg: SGD, params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


@build_optimizer.register
def _(cfg: Adam, params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


@build_optimizer.register
def _(cfg: AdamW, params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier of linear warm-up then cosine decay to `min_ratio` (per batch)."""
    if step < warmup:
        return _warmup(step, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@singledispatch
def build_schedule(cfg: object, opt: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> LRScheduler:
    """Build the per-batch LR scheduler described by `cfg`."""
    raise TypeError(f"no schedule for config type {type(cfg).__name__}")


@build_schedule.register
def _(cfg: Constant, opt, steps_per_epoch: int, epochs: int) -> LRScheduler:
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    return LambdaLR(opt, lambda s: _warmup(s, warm))


@build_schedule.register
def _(cfg: Step, opt, steps_per_epoch: int, epochs: int) -> LRScheduler:
    total, warm = steps_per_epoch * epochs, round(cfg.warmup_epochs * steps_per_epoch)
    bounds = [round(m * total) for m in cfg.milestones]
    return LambdaLR(opt, lambda s: _warmup(s, warm) * cfg.gamma ** sum(s >= b for b in bounds))


@build_schedule.register
def _(cfg: Cosine, opt, steps_per_epoch: int, epochs: int) -> LRScheduler:
    total, warm = steps_per_epoch * epochs, round(cfg.warmup_epochs * steps_per_epoch)
    base = opt.param_groups[0]["lr"]
    ratio = cfg.min_lr / base if base > 0 else 0.0
    return LambdaLR(opt, lambda s: cosine_factor(s, total, warm, ratio))


@build_schedule.register
def _(cfg: OneCycle, opt, steps_per_epoch: int, epochs: int) -> LRScheduler:
    max_lr = cfg.max_lr if cfg.max_lr is not None else opt.param_groups[0]["lr"]
    total = steps_per_epoch * epochs
    if total < 3:  # no room for a warm-up and an anneal (a smoke run): the peak throughout
        for g in opt.param_groups:
            g["lr"] = max_lr
        return LambdaLR(opt, lambda _: 1.0)
    # torch divides by (pct_start * total - 1) and by the anneal's length: where one would be <= 0,
    # a warm-up of one step (elsewhere torch's own schedule, unchanged)
    pct = cfg.pct_start if cfg.pct_start * total > 1 else 2.0 / total
    pct = min(pct, (total - 1.0) / total)
    return OneCycleLR(
        opt, max_lr=max_lr, total_steps=total, pct_start=pct,
        div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
        anneal_strategy=cfg.anneal_strategy.value,
    )


def advance_schedule(sched: LRScheduler, steps: int) -> None:
    """Move ``sched`` on by ``steps`` optimiser steps without training (a stage that continues a
    run, TrainConfig.start_epoch): the optimizer's LR is then the one the whole run would use."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            sched.step()
