"""Prune to a FLOPs or parameter budget: bisection over the global pruning ratio, measuring each
candidate on a physically pruned deep copy, then applying the chosen plan in place."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from kdprune.engine.allocate import PruningPlan, plan_pruning
from kdprune.engine.graph import ChannelGroup, channel_groups
from kdprune.engine.importance import Criterion, importance_scores
from kdprune.engine.prune import apply_plan
from kdprune.metrics import Complexity, complexity

__all__ = ["Target", "PruneReport", "prune_to_target", "TOLERANCE"]

#: |kept/dense - target| allowed, as a fraction of the dense model.
TOLERANCE = 0.01
_MAX_STEPS = 60


@dataclass(frozen=True)
class Target:
    """Fraction of the dense model's FLOPs or params to KEEP, in (0, 1); set exactly one."""

    flops: float | None = None
    params: float | None = None

    def __post_init__(self) -> None:
        set_ = [(k, v) for k, v in (("flops", self.flops), ("params", self.params)) if v is not None]
        if len(set_) != 1:
            raise ValueError(f"Target needs exactly one of flops= or params=, got {dict(set_) or 'none'}")
        key, value = set_[0]
        if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"Target {key}={value!r} must be a fraction to keep in (0, 1)")

    @property
    def metric(self) -> str:
        """"flops" or "params"."""
        return "flops" if self.flops is not None else "params"

    @property
    def value(self) -> float:
        """The fraction to keep."""
        return float(self.flops if self.flops is not None else self.params)


@dataclass(frozen=True)
class PruneReport:
    """What ``prune_to_target`` did."""

    target: Target
    achieved: float  # kept fraction of the target metric
    ratio: float  # allocation ratio handed to plan_pruning
    dense: Complexity
    pruned: Complexity
    plan: PruningPlan
    mode: str
    importance: str
    evaluations: int

    @property
    def flops_kept(self) -> float:
        """Kept FLOPs fraction."""
        return self.pruned.flops / self.dense.flops

    @property
    def params_kept(self) -> float:
        """Kept params fraction."""
        return self.pruned.params / self.dense.params


class _Search:
    """Memoised 'ratio -> kept fraction' on physically pruned copies of the model."""

    def __init__(self, model: nn.Module, x: torch.Tensor, target: Target, dense: Complexity,
                 make_plan: Callable[[float], PruningPlan]) -> None:
        self.model, self.x, self.target, self.dense, self.make_plan = model, x, target, dense, make_plan
        self.cache: dict[tuple, tuple[float, Complexity]] = {}

    def kept(self, ratio: float) -> tuple[float, PruningPlan, Complexity]:
        """Kept fraction, plan and complexity at one allocation ratio."""
        plan = self.make_plan(ratio)
        frac, c = self.measure(plan)
        return frac, plan, c

    def measure(self, plan: PruningPlan) -> tuple[float, Complexity]:
        """Kept fraction and complexity of ``plan`` (memoised on the plan)."""
        key = tuple((k, tuple(v)) for k, v in sorted(plan.to_dict().items()))
        if key not in self.cache:
            pruned = copy.deepcopy(self.model)
            apply_plan(pruned, self.x, plan)
            c = complexity(pruned, example_input=self.x)
            base = getattr(self.dense, self.target.metric)
            self.cache[key] = (getattr(c, self.target.metric) / base, c)
        return self.cache[key]


class _Missed(ValueError):
    """The ratio search jumped over the target; ``above`` is the ratio just above it."""

    def __init__(self, message: str, above: float) -> None:
        super().__init__(message)
        self.above = above


def _bisect(search: _Search, target: float) -> tuple[float, float, PruningPlan, Complexity]:
    """Find a ratio whose kept fraction is within TOLERANCE of target (kept(ratio) is monotone
    non-increasing); raise ValueError with the closest fractions if the step function jumps over."""
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(_MAX_STEPS):
        mid = (lo + hi) / 2
        frac, plan, c = search.kept(mid)
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (mid, frac, plan, c)
        if abs(frac - target) <= TOLERANCE:
            return mid, frac, plan, c
        lo, hi = (mid, hi) if frac > target else (lo, mid)
        if hi - lo < 1e-7:
            break
    above, below = search.kept(lo)[0], search.kept(hi)[0]
    raise _Missed(
        f"cannot reach {search.target.metric} target {target:.4f} within {TOLERANCE:.0%}: the "
        f"closest achievable kept fractions are {above:.4f} and {below:.4f} (width steps are too "
        "coarse, e.g. because of round_to or few channels); use a smaller round_to, "
        "mode='global', or a different target", lo
    )


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


def _mixed_rounding(search: _Search, groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                    plan: PruningPlan, min_width: int, round_to: int, missed: ValueError
                    ) -> tuple[float, PruningPlan, Complexity]:
    """From the plan just above the target, narrow one group at a time by one ``round_to`` step
    (some widths rounded down, the rest up) until the kept fraction lands within TOLERANCE.
    Each step takes the candidate closest to the target without overshooting it."""
    goal = search.target.value
    for _ in range(4 * len(groups)):
        cands = []
        for g in groups:
            idxs = _step_down(g, scores[g.root], plan.removals.get(g.root, ()), min_width, round_to)
            if idxs is not None:
                cand = PruningPlan({**plan.removals, g.root: idxs})
                cands.append((*search.measure(cand), cand))
        inside = [c for c in cands if abs(c[0] - goal) <= TOLERANCE]
        if inside:
            frac, c, best = min(inside, key=lambda t: abs(t[0] - goal))
            return frac, best, c
        above = [c for c in cands if c[0] > goal]
        if not above:
            break
        plan = min(above, key=lambda t: t[0])[2]
    raise ValueError(str(missed)) from None


def prune_to_target(
    model: nn.Module,
    example_input: torch.Tensor,
    target: Target,
    importance: str | Criterion = "l1",
    mode: str = "uniform",
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
    all_scores = importance_scores(model, groups, importance, scores, seed)
    dense = complexity(model, example_input=example_input)
    search = _Search(model, example_input, target, dense,
                     lambda r: plan_pruning(groups, all_scores, r, mode, min_width, round_to))
    floor, _, _ = search.kept(1.0)
    if target.value < floor - TOLERANCE:
        raise ValueError(
            f"{target.metric} target {target.value} is unreachable under min_width={min_width}"
            f"{f', round_to={round_to}' if round_to else ''}: the smallest reachable fraction is "
            f"{floor:.4f}"
        )
    if abs(floor - target.value) <= TOLERANCE:
        ratio, frac, plan, pruned = 1.0, *search.kept(1.0)
    else:
        try:
            ratio, frac, plan, pruned = _bisect(search, target.value)
        except _Missed as e:
            if not round_to or round_to <= 1:
                raise
            ratio = e.above
            frac, plan, pruned = _mixed_rounding(search, groups, all_scores, search.kept(e.above)[1],
                                                 min_width, round_to, e)
    apply_plan(model, example_input, plan)
    name = importance if isinstance(importance, str) else getattr(importance, "__name__", "custom")
    return PruneReport(target, frac, ratio, dense, pruned, plan, mode, name, len(search.cache))
