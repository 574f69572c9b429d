"""Adaptive-BN candidate selection (EagleEye, Li et al., ECCV 2020): prune the model to the target
under several allocations (uniform, global, and randomly shaped per-group rates), re-estimate each
candidate's BatchNorm statistics, score it on a small validation subset, keep the best allocation."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils.data import Subset

from kdprune.data import as_loader
from kdprune.engine.allocate import AnyAllocation, Global, PruningPlan, Shaped, Uniform
from kdprune.engine.budget import BudgetError, Target
from kdprune.engine.graph import ChannelGroup
from kdprune.engine.groups import channel_groups
from kdprune.engine.recalibrate import Recalibrate, recalibrate_norms
from kdprune.registry import choice

__all__ = ["AdaptiveBN", "Candidate", "adaptive_bn_score", "Selection", "candidate_allocations", "select_allocation",
           "shape_of", "top1"]


@choice("adaptive-bn")
@dataclass(frozen=True)
class AdaptiveBN:
    """EagleEye's adaptive-BN evaluation (Li et al., ECCV 2020) as an allocation: uniform, global and
    ``candidates`` random per-group rates (multipliers in [1 - spread, 1 + spread]), each pruned to
    the target, its BatchNorms re-estimated on ``batches`` training batches, scored by top-1 on
    ``images`` validation images; the best is applied."""

    candidates: int = 8
    spread: float = 0.5
    images: int = 1000
    batches: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.candidates < 0 or not 0 <= self.spread < 1 or self.images < 1 or self.batches < 1:
            raise ValueError("AdaptiveBN needs candidates >= 0, 0 <= spread < 1, images >= 1 and batches >= 1")


#: A recipe's allocation choice when it may also search: a fixed rule or the adaptive-BN search.
Selection = Union[Uniform, Global, AdaptiveBN]


@dataclass(frozen=True)
class Candidate:
    """One scored allocation: its name, the allocation, its subset top-1 (None: target unreachable)."""

    name: str
    allocation: AnyAllocation
    top1: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: name and score."""
        return {"name": self.name, "top1": self.top1}


def candidate_allocations(model: nn.Module, x: torch.Tensor, sel: AdaptiveBN) -> list[tuple[str, AnyAllocation]]:
    """Uniform, global, then ``sel.candidates`` random shapes over ``model``'s channel groups."""
    roots = [g.root for g in channel_groups(copy.deepcopy(model), x)]
    rng = random.Random(sel.seed)
    out: list[tuple[str, AnyAllocation]] = [("uniform", Uniform()), ("global", Global())]
    for i in range(sel.candidates):
        w = tuple((r, round(rng.uniform(1 - sel.spread, 1 + sel.spread), 4)) for r in roots)
        out.append((f"random{i + 1}", Shaped(w)))
    return out


def shape_of(plan: PruningPlan, groups: list[ChannelGroup]) -> Shaped:
    """The Shaped allocation that cuts each of ``groups`` by the fraction ``plan`` cuts it (at ratio =
    the largest such fraction; weight 0: a group ``plan`` leaves whole), so a method that ranks
    channels its own way can follow a chosen plan's per-group shape at any ratio."""
    frac = {g.root: len(plan.removals.get(g.root, ())) / g.channels for g in groups}
    top = max(frac.values(), default=0.0)
    return Shaped(tuple((r, round(f / top, 6) if top else 1.0) for r, f in frac.items()))


@torch.no_grad()
def top1(model: nn.Module, data: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy (percent) of ``model`` in eval mode on ``data``."""
    p = next(model.parameters())
    was_training, correct, seen = model.training, 0, 0
    model.eval()
    try:
        for x, y in as_loader(data, batch_size, shuffle=False, rank=0, world_size=1):
            correct += int((model(x.to(p.device)).argmax(1).cpu() == y).sum())
            seen += int(y.shape[0])
    finally:
        model.train(was_training)
    return 100.0 * correct / max(seen, 1)


def _subset(data: Any, n: int, seed: int) -> Any:
    if n >= len(data):
        return data
    if hasattr(data, "subset"):
        return data.subset(n, seed=seed)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(data, idx.tolist())


def adaptive_bn_score(model: nn.Module, train: Any, val: Any, sel: AdaptiveBN, before: nn.Module | None = None
                      ) -> float:
    """EagleEye's adaptive-BN score (Li et al. 2020): ``model``'s BatchNorms (those stale since
    ``before``; all without it) re-estimated in place on ``sel.batches`` training batches, then its
    top-1 on ``sel.images`` validation images."""
    recalibrate_norms(model, train, Recalibrate(batches=sel.batches, seed=sel.seed), before=before)
    return top1(model, _subset(val, sel.images, sel.seed))


def select_allocation(model: nn.Module, x: torch.Tensor, target: Target, sel: AdaptiveBN, train: Any, val: Any,
                      prune: Callable[[nn.Module, AnyAllocation], Any]) -> tuple[AnyAllocation, list[Candidate]]:
    """The allocation whose pruned, BN-recalibrated copy of ``model`` scores best on a ``val`` subset
    (EagleEye, Li et al. 2020); ``prune(copy, allocation)`` prunes a copy to ``target`` in place."""
    if val is None:
        raise ValueError("AdaptiveBN scores candidates on validation images: pass val data")
    scored: list[Candidate] = []
    for name, alloc in candidate_allocations(model, x, sel):
        m = copy.deepcopy(model)
        try:
            prune(m, alloc)
        except BudgetError:  # this shape cannot reach the target: not a candidate
            scored.append(Candidate(name, alloc, None))
            continue
        scored.append(Candidate(name, alloc, adaptive_bn_score(m, train, val, sel, before=model)))
    ok = [c for c in scored if c.top1 is not None]
    if not ok:
        raise BudgetError(f"AdaptiveBN: no candidate allocation reaches {target.metric} {target.value}", None)
    best = max(ok, key=lambda c: c.top1)  # the first of equals: uniform before global before random
    return best.allocation, scored
