"""Prune to a FLOPs or parameter budget: the budget service bisects the pruning ratio (each
candidate measured on a physically pruned deep copy), with round_to a mixed-rounding refinement,
then the chosen plan is applied in place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from kdprune.engine.allocate import Allocation, PruningPlan, Uniform, plan_pruning
from kdprune.engine.budget import (TOLERANCE, Bisection, BudgetError, BudgetFit, BudgetMeter, Refine, Target,
                                   fit_budget)
from kdprune.engine.describe import coverage_summary, describe
from kdprune.engine.graph import ChannelGroup, channel_groups
from kdprune.engine.importance import L1, Criterion, importance_scores
from kdprune.engine.prune import apply_plan
from kdprune.metrics import Complexity

__all__ = ["Target", "PruneReport", "prune_to_target", "TOLERANCE"]


@dataclass(frozen=True)
class PruneReport:
    """What ``prune_to_target`` did."""

    target: Target
    achieved: float  # kept fraction of the target metric
    ratio: float  # allocation ratio handed to plan_pruning
    dense: Complexity
    pruned: Complexity
    plan: PruningPlan
    mode: Allocation
    importance: Criterion
    evaluations: int

    @property
    def flops_kept(self) -> float:
        """Kept FLOPs fraction."""
        return self.pruned.flops / self.dense.flops

    @property
    def params_kept(self) -> float:
        """Kept params fraction."""
        return self.pruned.params / self.dense.params


def _step_down(group: ChannelGroup, scores: torch.Tensor, removed: tuple[int, ...], min_width: int,
               round_to: int) -> tuple[int, ...] | None:
    """``removed`` plus the lowest-score kept channels that take the group one ``round_to``
    multiple narrower, or None if no narrower legal width exists."""
    width = group.channels - len(removed)
    new = (width - 1) // round_to * round_to
    if new < max(min_width, 1, round_to):
        return None
    kept = [i for i in range(group.channels) if i not in set(removed)]
    order = sorted(kept, key=lambda i: (float(scores[i]), i))
    return tuple(sorted(set(removed) | set(order[: width - new])))


class _MixedRounding:
    """Neighbour moves for the budget service under ``round_to``: narrow one group by one
    ``round_to`` step (its lowest-score kept channels), so some widths round down and the rest up."""

    def __init__(self, groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                 min_width: int, round_to: int) -> None:
        self.groups, self.scores, self.min_width, self.round_to = groups, scores, min_width, round_to

    def __call__(self, plan: PruningPlan, over: bool) -> list[list[PruningPlan]]:
        """One tier: every group's one-step-narrower plan (the search starts above the target)."""
        cands = []
        for g in self.groups:
            idxs = _step_down(g, self.scores[g.root], plan.removals.get(g.root, ()), self.min_width,
                              self.round_to)
            if idxs is not None:
                cands.append(PruningPlan({**plan.removals, g.root: idxs}))
        return [cands]


def prune_to_target(
    model: nn.Module,
    example_input: torch.Tensor,
    target: Target,
    importance: Criterion = L1(),
    mode: Allocation = Uniform(),
    min_width: int = 1,
    round_to: int | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    ignored_layers: Sequence[nn.Module | str] = (),
    seed: int = 0,
) -> PruneReport:
    """Prune ``model`` in place to keep ``target`` of its FLOPs/params (within 1%), ranking
    channels by ``importance`` (PFEC L1 of Li et al. 2017 by default) on DepGraph groups."""
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    groups: list[ChannelGroup] = channel_groups(model, example_input, ignored_layers)
    if not groups:  # name the real cause, not min_width
        rows = describe(model, example_input, ignored_layers)
        raise ValueError(f"{target.metric} target {target.value} is unreachable in {type(model).__name__}: "
                         f"{coverage_summary(rows)}")
    all_scores = importance_scores(model, groups, importance, scores, seed)
    meter = BudgetMeter(model, example_input, target)
    try:
        fit = _fit(model, example_input, target, groups, all_scores, mode, min_width, round_to, meter)
    except BudgetError as e:
        if e.fit.floor.kept <= target.value + TOLERANCE:
            raise
        rows = describe(model, example_input, ignored_layers)  # why the floor is that high
        raise BudgetError(f"{e}; {coverage_summary(rows)}", e.fit) from None
    apply_plan(model, example_input, fit.best.candidate)
    return PruneReport(target, fit.best.kept, fit.t, meter.dense, fit.best.complexity, fit.best.candidate,
                       mode, importance, meter.evaluations)


def _fit(model: nn.Module, example_input: torch.Tensor, target: Target, groups: Sequence[ChannelGroup],
         all_scores: Mapping[str, torch.Tensor], mode: Allocation, min_width: int, round_to: int | None,
         meter: BudgetMeter) -> BudgetFit:
    rounding = round_to is not None and round_to > 1
    return fit_budget(
        model, example_input, target,
        lambda r: plan_pruning(groups, all_scores, r, mode, min_width, round_to),
        _MixedRounding(groups, all_scores, min_width, round_to) if rounding else None,
        bisection=Bisection(first_within=True), refine=Refine(rounds=4 * len(groups), one_sided=True),
        meter=meter, limits=f" under min_width={min_width}{f', round_to={round_to}' if round_to else ''}",
        advice=" (width steps are too coarse, e.g. because of round_to or few channels); use a smaller "
               "round_to, mode=Global(), or a different target")
