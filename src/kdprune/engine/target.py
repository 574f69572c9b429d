"""Prune to a FLOPs, parameter or latency budget: the budget service bisects the pruning ratio
(each candidate measured on a physically pruned deep copy; latency predicted from the per-layer
table, then measured end to end), with round_to or a width policy a mixed-rounding refinement,
then the chosen plan is applied in place."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping, Sequence

import torch
from torch import nn

from kdprune.engine.allocate import AnyAllocation, PruningPlan, Uniform, WidthFloor, floor_of, plan_pruning
from kdprune.engine.budget import (TOLERANCE, Bisection, BudgetError, BudgetFit, BudgetMeter, LatencyCheck,
                                   LatencyError, Refine, Target, fit_budget)
from kdprune.engine.describe import coverage_summary, describe
from kdprune.engine.graph import ChannelGroup
from kdprune.engine.groups import channel_groups
from kdprune.engine.importance import L1, Criterion, importance_scores
from kdprune.engine.prune import apply_plan
from kdprune.engine.widths import (FreeWidths, LegalSteps, MeasuredWidths, RoundTo, WidthPolicy, measured_widths,
                                   snap_plan, width_table)
from kdprune.metrics import Complexity
from kdprune.registry import check_choice

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
    mode: AnyAllocation
    importance: Criterion
    evaluations: int
    widths: WidthPolicy = FreeWidths()
    latency: LatencyCheck | None = None  # a latency target's end-to-end check
    fast_widths: Mapping[str, tuple[int, ...]] | None = None  # MeasuredWidths: each group's legal widths

    @property
    def flops_kept(self) -> float:
        """Kept FLOPs fraction."""
        return self.pruned.flops / self.dense.flops

    @property
    def params_kept(self) -> float:
        """Kept params fraction."""
        return self.pruned.params / self.dense.params


def _step_down(group: ChannelGroup, scores: torch.Tensor, removed: tuple[int, ...], min_width: WidthFloor,
               round_to: int) -> tuple[int, ...] | None:
    """``removed`` plus the lowest-score kept channels that take the group one ``round_to``
    multiple narrower (whole tie classes, the lowest summed score first, where ties bind channels),
    or None if no narrower legal width exists."""
    min_width = floor_of(min_width, group)
    if group.ties:
        return _step_down_tied(group, scores, removed, min_width, round_to)
    width = group.channels - len(removed)
    new = (width - 1) // round_to * round_to
    if new < max(min_width, 1, round_to):
        return None
    kept = [i for i in range(group.channels) if i not in set(removed)]
    order = sorted(kept, key=lambda i: (float(scores[i]), i))
    return tuple(sorted(set(removed) | set(order[: width - new])))


def _step_down_tied(group: ChannelGroup, scores: torch.Tensor, removed: tuple[int, ...], min_width: WidthFloor,
                    round_to: int) -> tuple[int, ...] | None:
    gone = set(removed)
    kept = sorted((c for c in group.ties if not gone & set(c)), key=lambda c: (float(scores[list(c)].mean()), c))
    for k in range(1, len(kept)):  # the fewest classes that land on a multiple of round_to
        out = gone.union(*kept[:k])
        width = group.channels - len(out)
        if width < max(min_width, 1):
            return None
        if width % round_to == 0:
            return tuple(sorted(out))
    return None


class _MixedRounding:
    """Neighbour moves for the budget service under ``round_to``: narrow one group by one
    ``round_to`` step (its lowest-score kept channels), so some widths round down and the rest up."""

    def __init__(self, groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                 min_width: WidthFloor, round_to: int) -> None:
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
    mode: AnyAllocation = Uniform(),
    min_width: WidthFloor = 1,
    round_to: int | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    ignored_layers: Sequence[nn.Module | str] = (),
    seed: int = 0,
    widths: WidthPolicy = FreeWidths(),
    reference: nn.Module | None = None,
) -> PruneReport:
    """Prune ``model`` in place to keep ``target`` of its FLOPs/params (within 1%) or measured
    latency (within 5%; of ``reference``'s when given), ranking channels by ``importance`` (PFEC L1
    of Li et al. 2017 by default) on DepGraph groups, widths as ``widths`` (or ``round_to``) allow."""
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target, got {type(target).__name__}")
    widths = _policy(widths, round_to)
    groups: list[ChannelGroup] = channel_groups(model, example_input, ignored_layers)
    if not groups:  # name the real cause, not min_width
        rows = describe(model, example_input, ignored_layers)
        raise ValueError(f"{target.metric} target {target.value} is unreachable in {type(model).__name__}: "
                         f"{coverage_summary(rows)}")
    all_scores = importance_scores(model, groups, importance, scores, seed)
    meter = BudgetMeter(model, example_input, target, partial(apply_plan, groups=groups), reference=reference)
    legal = None
    if isinstance(widths, MeasuredWidths):
        table = width_table(widths, target.latency_backend, target.latency_batch) if target.latency is not None \
            else width_table(widths)
        legal = measured_widths(model, example_input, groups, all_scores, widths, table, min_width)
    try:
        fit = _fit(model, example_input, target, groups, all_scores, mode, min_width, widths, legal, meter)
    except BudgetError as e:
        if e.fit is None or e.fit.floor.kept <= target.value + target.tolerance:
            raise
        rows = describe(model, example_input, ignored_layers)  # why the floor is that high
        if isinstance(e, LatencyError):
            raise LatencyError(f"{e}; {coverage_summary(rows)}", e.fit, e.check) from None
        raise BudgetError(f"{e}; {coverage_summary(rows)}", e.fit) from None
    apply_plan(model, example_input, fit.best.candidate, groups)
    achieved = fit.latency.measured if fit.latency is not None else fit.best.kept
    return PruneReport(target, achieved, fit.t, meter.dense, fit.best.complexity, fit.best.candidate,
                       mode, importance, meter.evaluations, widths, fit.latency, legal)


def _policy(widths: WidthPolicy, round_to: int | None) -> WidthPolicy:
    """The width policy, ``round_to=n`` being ``RoundTo(n)``."""
    check_choice(widths, WidthPolicy, "widths")
    if round_to is not None and not isinstance(widths, FreeWidths):
        raise ValueError(f"give round_to or widths={type(widths).__name__}(...), not both")
    return RoundTo(round_to) if round_to is not None and round_to > 1 else widths


def _fit(model: nn.Module, example_input: torch.Tensor, target: Target, groups: Sequence[ChannelGroup],
         all_scores: Mapping[str, torch.Tensor], mode: AnyAllocation, min_width: WidthFloor, widths: WidthPolicy,
         legal: Mapping[str, tuple[int, ...]] | None, meter: BudgetMeter) -> BudgetFit:
    round_to = widths.n if isinstance(widths, RoundTo) else None
    if legal is not None:
        def propose(r: float) -> PruningPlan:
            return snap_plan(groups, all_scores, plan_pruning(groups, all_scores, r, mode, min_width), legal)
        neighbours = LegalSteps(groups, all_scores, legal)
        rule = ", widths=MeasuredWidths"
    else:
        def propose(r: float) -> PruningPlan:
            return plan_pruning(groups, all_scores, r, mode, min_width, round_to)
        # tie classes (grouped convs, shuffles) make widths move in coarse steps, as round_to does
        coarse = round_to or (1 if any(g.ties for g in groups) else None)
        neighbours = _MixedRounding(groups, all_scores, min_width, coarse) if coarse else None
        rule = f", round_to={round_to}" if round_to else ""
    return fit_budget(
        model, example_input, target, propose, neighbours,
        bisection=Bisection(first_within=True), refine=Refine(rounds=4 * len(groups), one_sided=True),
        meter=meter, limits=f" under min_width={min_width}{rule}",
        advice=" (width steps are too coarse, e.g. because of round_to, measured widths or few channels); use a "
               "smaller round_to, FreeWidths(), mode=Global(), or a different target")
