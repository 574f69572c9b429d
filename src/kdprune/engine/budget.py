"""The budget service: fit a FLOPs/params Target over any monotone family of edits.

A family is ``propose(t) -> candidate`` for t in [0, 1]: t = 0 edits (almost) nothing, t = 1 the
most the family allows, and the kept fraction does not grow with t (a channel ratio, a number of
blocks removed, a rank cut). The service measures each candidate on a physically edited deep copy
of the model (memoised on the candidate's key), bisects t, and optionally refines over discrete
neighbour moves, so every method lands within ``TOLERANCE`` of its target or gets a ``BudgetError``
naming the reachable bounds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Iterable, Sequence, TypeVar

import torch
from torch import nn

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.prune import apply_plan
from kdprune.metrics import Complexity, complexity

__all__ = ["TOLERANCE", "Target", "Bisection", "Refine", "Measured", "BudgetFit", "BudgetError",
           "BudgetMeter", "plan_key", "bisect_budget", "refine_budget", "search_budget", "fit_budget"]

#: |kept/dense - target| allowed, as a fraction of the dense model.
TOLERANCE = 0.01

C = TypeVar("C")  # a candidate edit: a PruningPlan, a number of blocks, keep masks...


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
class Bisection:
    """How t is bisected: at most ``steps`` halvings. ``first_within``: stop at the first candidate
    within tolerance; otherwise run every step and keep the bracket end closer to the target."""

    steps: int = 24  # the bracket is then < 1e-7: finer than any one edit's share
    first_within: bool = True


@dataclass(frozen=True)
class Refine:
    """Greedy neighbour moves after a bisection miss, at most ``rounds`` of them. ``one_sided``:
    start from the candidate just above the target and only step to ones still above it (or
    within tolerance); otherwise start from the closest one and take any move that gets closer."""

    rounds: int = 16
    one_sided: bool = False


@dataclass(frozen=True)
class Measured(Generic[C]):
    """One candidate, the kept fraction of the target metric and the complexity after its edit."""

    candidate: C
    kept: float
    complexity: Complexity


@dataclass(frozen=True)
class BudgetFit(Generic[C]):
    """What the search found: ``best`` at family parameter ``t`` (for a refined candidate, the t it
    started from), ``floor`` at t = 1 and, after a full bisection, the bracket ends ``lo``/``hi``
    as (t, measured) with lo above the target and hi below it."""

    t: float
    best: Measured[C]
    floor: Measured[C]
    lo: tuple[float, Measured[C]] | None
    hi: tuple[float, Measured[C]] | None
    met: bool
    refined: bool
    evaluations: int


class BudgetError(ValueError):
    """The target cannot be met within tolerance; ``fit`` holds the closest candidates found."""

    def __init__(self, message: str, fit: BudgetFit) -> None:
        super().__init__(message)
        self.fit = fit


def plan_key(plan: PruningPlan) -> tuple:
    """Hashable identity of a PruningPlan (group order does not matter)."""
    return tuple(sorted((k, tuple(v)) for k, v in plan.items()))


def _default_key(candidate: Any) -> Hashable:
    return plan_key(candidate) if isinstance(candidate, PruningPlan) else candidate


class BudgetMeter(Generic[C]):
    """Memoised 'candidate -> kept fraction' on physically edited deep copies of ``model``."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, target: Target,
                 apply: Callable[[nn.Module, torch.Tensor, C], Any] = apply_plan,
                 key: Callable[[C], Hashable] = _default_key, max_cache: int | None = None,
                 dense: Complexity | None = None) -> None:
        self.model, self.x, self.target, self.apply, self.key = model, example_input, target, apply, key
        self.max_cache = max_cache
        # What kept fractions are relative to: the model itself, or the user's original model when
        # ``model`` is an intermediate form (EDP's decomposed model costs more than the original).
        self.dense = dense if dense is not None else complexity(model, example_input=example_input)
        self.evaluations = 0  # physical measurements (cache misses)
        self._cache: dict[Hashable, tuple[float, Complexity]] = {}

    def measure(self, candidate: C) -> Measured[C]:
        """Kept fraction and complexity of ``candidate`` (edited on a copy; the model is untouched)."""
        k = self.key(candidate)
        if k not in self._cache:
            if self.max_cache is not None and len(self._cache) >= self.max_cache:
                self._cache.clear()  # long training runs see many gate rankings: bound the memory
            with torch.random.fork_rng(devices=[]):  # tracing must not move the caller's RNG
                edited = copy.deepcopy(self.model)
                self.apply(edited, self.x, candidate)
                c = complexity(edited, example_input=self.x)
            metric = self.target.metric
            self._cache[k] = (float(getattr(c, metric)) / float(getattr(self.dense, metric)), c)
            self.evaluations += 1
        kept, c = self._cache[k]
        return Measured(candidate, kept, c)

    def kept(self, candidate: C) -> float:
        """Kept fraction of the target metric after ``candidate``'s edit."""
        return self.measure(candidate).kept


def _within(m: Measured, goal: float) -> bool:
    return abs(m.kept - goal) <= TOLERANCE


def bisect_budget(meter: BudgetMeter[C], propose: Callable[[float], C], policy: Bisection = Bisection()
                  ) -> BudgetFit[C]:
    """Bisect t over the monotone family ``propose``; never raises (``met`` says if it landed)."""
    goal = meter.target.value
    floor = meter.measure(propose(1.0))
    if floor.kept >= goal or (policy.first_within and _within(floor, goal)):
        return _fit(meter, 1.0, floor, floor)
    lo, hi, m_lo, m_hi = 0.0, 1.0, None, floor
    for _ in range(policy.steps):
        mid = (lo + hi) / 2
        m = meter.measure(propose(mid))
        if policy.first_within and _within(m, goal):
            return _fit(meter, mid, m, floor)
        lo, m_lo, hi, m_hi = (mid, m, hi, m_hi) if m.kept > goal else (lo, m_lo, mid, m)
    m_lo = m_lo if m_lo is not None else meter.measure(propose(lo))
    t, best = (lo, m_lo) if abs(m_lo.kept - goal) <= abs(m_hi.kept - goal) else (hi, m_hi)
    return _fit(meter, t, best, floor, (lo, m_lo), (hi, m_hi))


def _fit(meter: BudgetMeter, t: float, best: Measured, floor: Measured, lo: tuple | None = None,
         hi: tuple | None = None, refined: bool = False) -> BudgetFit:
    return BudgetFit(t, best, floor, lo, hi, _within(best, meter.target.value), refined, meter.evaluations)


Neighbours = Callable[[Any, bool], Iterable[Sequence[Any]]]


def refine_budget(meter: BudgetMeter[C], start: C, neighbours: Neighbours, policy: Refine = Refine()
                  ) -> Measured[C]:
    """Greedy descent over discrete moves. ``neighbours(candidate, over)`` yields tiers of
    candidates moving towards the target (``over``: the candidate keeps too much), tried in order
    until one tier has an acceptable move; the move closest to the target is taken."""
    goal = meter.target.value
    best = meter.measure(start)
    side = best.kept > goal
    for _ in range(policy.rounds):
        if _within(best, goal):
            break
        for tier in neighbours(best.candidate, best.kept > goal):
            cands = [meter.measure(c) for c in tier]
            if policy.one_sided:
                ok = [c for c in cands if _within(c, goal) or (c.kept > goal) == side]
            else:
                ok = [c for c in cands if abs(c.kept - goal) < abs(best.kept - goal)]
            if ok:
                best = min(ok, key=lambda c: abs(c.kept - goal))  # first of equals: stable
                break
        else:
            break
    return best


def search_budget(meter: BudgetMeter[C], propose: Callable[[float], C], neighbours: Neighbours | None = None,
                  bisection: Bisection = Bisection(), refine: Refine = Refine()) -> BudgetFit[C]:
    """Bisect, then refine a miss with ``neighbours`` when given; never raises."""
    fit = bisect_budget(meter, propose, bisection)
    if fit.met or neighbours is None or (refine.one_sided and fit.lo is None):
        return fit  # one-sided refinement descends from the bracket end above the target
    t, start = fit.lo if refine.one_sided else (fit.t, fit.best)
    best = refine_budget(meter, start.candidate, neighbours, refine)
    return _fit(meter, t, best, fit.floor, fit.lo, fit.hi, refined=True)


def fit_budget(model: nn.Module, example_input: torch.Tensor, target: Target, propose: Callable[[float], C],
               neighbours: Neighbours | None = None, *, apply: Callable[[nn.Module, torch.Tensor, C], Any] = apply_plan,
               key: Callable[[C], Hashable] = _default_key, bisection: Bisection = Bisection(),
               refine: Refine = Refine(), meter: BudgetMeter[C] | None = None, limits: str = "",
               advice: str = "") -> BudgetFit[C]:
    """Fit ``target`` over the family ``propose`` (see the module doc) within TOLERANCE, or raise
    BudgetError naming the reachable bounds; ``limits``/``advice`` extend its message."""
    meter = meter or BudgetMeter(model, example_input, target, apply, key)
    fit = search_budget(meter, propose, neighbours, bisection, refine)
    if fit.met:
        return fit
    metric, goal = target.metric, target.value
    if fit.floor.kept > goal + TOLERANCE:
        raise BudgetError(f"{metric} target {goal} is unreachable{limits}: the smallest reachable "
                          f"fraction is {fit.floor.kept:.4f}", fit)
    ends = [fit.lo[1].kept, fit.hi[1].kept] if fit.lo and fit.hi else [fit.best.kept]
    raise BudgetError(f"cannot reach {metric} target {goal:.4f} within {TOLERANCE:.0%}: the closest "
                      f"achievable kept fractions are {' and '.join(f'{k:.4f}' for k in ends)}{advice}", fit)
