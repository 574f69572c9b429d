"""The budget service: fit a FLOPs, params or latency Target over any monotone family of edits.

A family is ``propose(t) -> candidate`` for t in [0, 1]: t = 0 edits (almost) nothing, t = 1 the
most the family allows, and the kept fraction does not grow with t (a channel ratio, a number of
blocks removed, a rank cut). The service measures each candidate on a physically edited deep copy
of the model (memoised on the candidate's key), bisects t, and optionally refines over discrete
neighbour moves, so every method lands within ``TOLERANCE`` of its target or gets a ``BudgetError``
naming the reachable bounds.

A latency target's kept fraction is *predicted* from the per-layer latency table
(``kdprune.metrics.latency_table``: the candidate's layer entries plus the overhead fitted on the
dense model), so bisecting stays cheap. The chosen candidate is then measured end to end,
interleaved with the dense model; when it misses by more than ``LATENCY_TOLERANCE`` the search is
rerun under a correction, a line from predicted to measured kept latency (at most
``LATENCY_REFITS`` times) before a ``LatencyError`` names the closest kept latency measured. The
first correction scales the predicted saving by the measured/predicted ratio (the dense model,
(1, 1), is predicted exactly); later ones are false-position steps through the measured pairs on
either side of the target (halved when they stop shrinking the bracket; aimed at the family's
floor while no pair is below the target).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Generic, Hashable, Iterable, Sequence, TypeVar

import torch
from torch import nn

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.prune import apply_plan
from kdprune.metrics import Backend, Complexity, LatencyModel, complexity, shared_table
from kdprune.registry import check_choice

__all__ = ["TOLERANCE", "LATENCY_TOLERANCE", "LATENCY_REFITS", "Target", "Bisection", "Refine", "Measured",
           "BudgetFit", "BudgetError", "LatencyCheck", "LatencyError", "BudgetMeter", "plan_key", "bisect_budget",
           "refine_budget", "search_budget", "fit_budget", "verify_latency"]

#: |kept/dense - target| allowed, as a fraction of the dense model (also the precision every search
#: aims for, latency predictions included).
TOLERANCE = 0.01
#: |measured kept latency - target| allowed: end-to-end timing on a shared CPU is noisy.
LATENCY_TOLERANCE = 0.05
#: Searches rerun with a measured/predicted correction before a latency target is given up.
LATENCY_REFITS = 5

C = TypeVar("C")  # a candidate edit: a PruningPlan, a number of blocks, keep masks...


@dataclass(frozen=True)
class Target:
    """Fraction of the dense model's FLOPs, params or measured latency to KEEP, in (0, 1); set
    exactly one. Latency is measured on this machine at ``latency_batch`` on ``latency_backend``."""

    flops: float | None = None
    params: float | None = None
    latency: float | None = None
    latency_batch: int = 1
    latency_backend: Backend = Backend.EAGER

    def __post_init__(self) -> None:
        set_ = [(k, v) for k, v in (("flops", self.flops), ("params", self.params), ("latency", self.latency))
                if v is not None]
        if len(set_) != 1:
            raise ValueError(f"Target needs exactly one of flops=, params= or latency=, got {dict(set_) or 'none'}")
        key, value = set_[0]
        if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
            raise ValueError(f"Target {key}={value!r} must be a fraction to keep in (0, 1)")
        if not isinstance(self.latency_batch, int) or isinstance(self.latency_batch, bool) or self.latency_batch < 1:
            raise ValueError(f"Target latency_batch={self.latency_batch!r} must be an integer >= 1")
        check_choice(self.latency_backend, Backend, "Target.latency_backend")

    @property
    def metric(self) -> str:
        """"flops", "params" or "latency"."""
        return "flops" if self.flops is not None else "params" if self.params is not None else "latency"

    @property
    def value(self) -> float:
        """The fraction to keep."""
        return float(next(v for v in (self.flops, self.params, self.latency) if v is not None))

    @property
    def tolerance(self) -> float:
        """How far the kept fraction may land from ``value``: 1%, or 5% of measured latency."""
        return LATENCY_TOLERANCE if self.latency is not None else TOLERANCE

    def describe(self) -> str:
        """One line for messages: "flops 0.5", "latency 0.5 (batch 1, eager)"."""
        where = f" (batch {self.latency_batch}, {self.latency_backend.value})" if self.latency is not None else ""
        return f"{self.metric} {self.value:g}{where}"


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
    """One candidate, the kept fraction of the target metric and the complexity after its edit
    (for a latency target: the kept fraction predicted and corrected, and the prediction in latency
    table units)."""

    candidate: C
    kept: float
    complexity: Complexity
    predicted: float | None = None


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
    latency: "LatencyCheck | None" = None


@dataclass(frozen=True)
class LatencyCheck:
    """The end-to-end check of a latency fit: the kept latency measured (candidate median / dense
    median, interleaved) and predicted (table, uncorrected), the correction and refits it took,
    and the table entries this search timed (``entries_measured``; the rest came from the cache)."""

    target: float
    measured: float
    predicted: float
    correction: float  # slope of the predicted -> measured line the fit used (1: none)
    anchor: tuple[float, float]  # a (predicted, measured) point on that line
    refits: int
    dense_ms: float
    pruned_ms: float
    predicted_ms: float  # the predicted kept fraction of the dense ms measured alongside
    entries: int
    entries_measured: int
    backend: str
    batch: int
    threads: int

    @property
    def met(self) -> bool:
        """Whether the measured kept latency is within LATENCY_TOLERANCE of the target."""
        return abs(self.measured - self.target) <= LATENCY_TOLERANCE

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (for reports)."""
        return {**asdict(self), "met": self.met}


class BudgetError(ValueError):
    """The target cannot be met within tolerance; ``fit`` holds the closest candidates found."""

    def __init__(self, message: str, fit: BudgetFit | None) -> None:
        super().__init__(message)
        self.fit = fit


class LatencyError(BudgetError):
    """A latency target missed when measured end to end; ``check`` is the closest candidate's check."""

    def __init__(self, message: str, fit: BudgetFit | None, check: LatencyCheck) -> None:
        super().__init__(message, fit)
        self.check = check


def plan_key(plan: PruningPlan) -> tuple:
    """Hashable identity of a PruningPlan (group order does not matter)."""
    return tuple(sorted((k, tuple(v)) for k, v in plan.items()))


def _default_key(candidate: Any) -> Hashable:
    return plan_key(candidate) if isinstance(candidate, PruningPlan) else candidate


class BudgetMeter(Generic[C]):
    """Memoised 'candidate -> kept fraction' on physically edited deep copies of ``model``. For a
    latency target the fraction is predicted by ``latency`` (default: a LatencyModel of
    ``reference``, or of ``model``, on the shared table of the target's backend and batch)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, target: Target,
                 apply: Callable[[nn.Module, torch.Tensor, C], Any] = apply_plan,
                 key: Callable[[C], Hashable] = _default_key, max_cache: int | None = None,
                 dense: Complexity | None = None, reference: nn.Module | None = None,
                 latency: LatencyModel | None = None) -> None:
        self.model, self.x, self.target, self.apply, self.key = model, example_input, target, apply, key
        self.max_cache = max_cache
        # What kept fractions are relative to: the model itself, or the user's original model when
        # ``model`` is an intermediate form (EDP's decomposed model costs more than the original).
        ref = reference if reference is not None else model
        self.dense = dense if dense is not None else complexity(ref, example_input=example_input)
        self.latency = latency
        if target.metric == "latency" and latency is None:
            table = shared_table(target.latency_backend, target.latency_batch)
            self.latency = LatencyModel(ref, example_input, table)
        # The correction: a line from predicted to measured kept latency through ``anchor`` with
        # slope ``correction``; the identity until verify_latency has measured candidates.
        self.anchor, self.correction = (1.0, 1.0), 1.0
        self.evaluations = 0  # physical measurements (cache misses)
        self._cache: dict[Hashable, tuple[float, Complexity]] = {}

    def edit(self, candidate: C) -> nn.Module:
        """A deep copy of the model with ``candidate``'s edit applied (the caller's RNG untouched)."""
        with torch.random.fork_rng(devices=[]):  # tracing must not move the caller's RNG
            edited = copy.deepcopy(self.model)
            self.apply(edited, self.x, candidate)
        return edited

    def measure(self, candidate: C) -> Measured[C]:
        """Kept fraction and complexity of ``candidate`` (edited on a copy; the model is untouched)."""
        k = self.key(candidate)
        if k not in self._cache:
            if self.max_cache is not None and len(self._cache) >= self.max_cache:
                self._cache.clear()  # long training runs see many gate rankings: bound the memory
            edited = self.edit(candidate)
            with torch.random.fork_rng(devices=[]):
                c = complexity(edited, example_input=self.x)
                raw = self.latency.predict(edited) if self.latency is not None else float(
                    getattr(c, self.target.metric))
            self._cache[k] = (raw, c)  # raw values: a later correction rescales them, no re-edit
            self.evaluations += 1
        raw, c = self._cache[k]
        return Measured(candidate, self._kept(raw), c, raw if self.latency is not None else None)

    def _kept(self, raw: float) -> float:
        if self.latency is not None:
            return self.anchor[1] + self.correction * (raw / self.latency.dense_units - self.anchor[0])
        return raw / float(getattr(self.dense, self.target.metric))

    def correct(self, a: tuple[float, float], b: tuple[float, float]) -> None:
        """Map predicted to measured kept latency by the line through (predicted, measured) points
        ``a`` and ``b``; memoised candidates are rescaled, not measured again."""
        if a[0] == b[0] or (a[1] - b[1]) / (a[0] - b[0]) <= 0:
            raise ValueError(f"a latency correction needs a rising line, got {a} and {b}")
        self.anchor, self.correction = a, (a[1] - b[1]) / (a[0] - b[0])

    def predicted_goal(self) -> float:
        """The uncorrected predicted kept latency that the correction maps onto the target."""
        return self.anchor[0] + (self.target.value - self.anchor[1]) / self.correction

    def kept(self, candidate: C) -> float:
        """Kept fraction of the target metric after ``candidate``'s edit."""
        return self.measure(candidate).kept

    def measure_end_to_end(self, candidate: C) -> tuple[float, float, float]:
        """(kept latency, dense ms, candidate ms) of ``candidate`` timed end to end, interleaved."""
        if self.latency is None:
            raise ValueError(f"measure_end_to_end needs a latency target, not {self.target.describe()}")
        dense_ms, ms = self.latency.measure(self.edit(candidate))
        return ms / dense_ms, dense_ms, ms


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
    met = abs(best.kept - meter.target.value) <= meter.target.tolerance
    return BudgetFit(t, best, floor, lo, hi, met, refined, meter.evaluations)


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
    if _within(fit.best, meter.target.value) or neighbours is None or (refine.one_sided and fit.lo is None):
        return fit  # one-sided refinement descends from the bracket end above the target
    t, start = fit.lo if refine.one_sided else (fit.t, fit.best)
    best = refine_budget(meter, start.candidate, neighbours, refine)
    return _fit(meter, t, best, fit.floor, fit.lo, fit.hi, refined=True)


def fit_budget(model: nn.Module, example_input: torch.Tensor, target: Target, propose: Callable[[float], C],
               neighbours: Neighbours | None = None, *,
               apply: Callable[[nn.Module, torch.Tensor, C], Any] = apply_plan,
               key: Callable[[C], Hashable] = _default_key, bisection: Bisection = Bisection(),
               refine: Refine = Refine(), meter: BudgetMeter[C] | None = None, limits: str = "",
               advice: str = "", verify: bool = True) -> BudgetFit[C]:
    """Fit ``target`` over the family ``propose`` (see the module doc) within its tolerance, or raise
    BudgetError naming the reachable bounds; ``limits``/``advice`` extend its message. A latency
    fit is measured end to end and refitted (``verify``; False trusts the prediction)."""
    meter = meter or BudgetMeter(model, example_input, target, apply, key)

    def search() -> BudgetFit[C]:
        return search_budget(meter, propose, neighbours, bisection, refine)

    fit = search()
    if meter.latency is not None and verify:
        return _verified(meter, fit, search, limits, advice)
    if fit.met:
        return fit
    metric, goal, tol = target.metric, target.value, target.tolerance
    if fit.floor.kept > goal + tol:
        raise BudgetError(f"{metric} target {goal} is unreachable{limits}: the smallest reachable "
                          f"fraction is {fit.floor.kept:.4f}", fit)
    ends = [fit.lo[1].kept, fit.hi[1].kept] if fit.lo and fit.hi else [fit.best.kept]
    raise BudgetError(f"cannot reach {metric} target {goal:.4f} within {tol:.0%}: the closest "
                      f"achievable kept fractions are {' and '.join(f'{k:.4f}' for k in ends)}{advice}", fit)


def _verified(meter: BudgetMeter[C], fit: BudgetFit[C], search: Callable[[], BudgetFit[C]], limits: str,
              advice: str) -> BudgetFit[C]:
    """``fit`` checked end to end; refits run ``search`` again under the new correction."""
    fits = [fit]

    def refit() -> Measured[C]:
        fits.append(search())
        return fits[-1].best

    try:
        best, check = verify_latency(meter, refit, fit.best, floor=fit.floor, limits=limits, advice=advice)
    except LatencyError as e:
        raise LatencyError(str(e), fits[-1], e.check) from None
    done = next(f for f in reversed(fits) if f.best is best)
    return replace(done, best=best, met=True, evaluations=meter.evaluations, latency=check)


def verify_latency(meter: BudgetMeter[C], refit: Callable[[], Measured[C]], start: Measured[C] | None = None,
                   floor: Measured[C] | None = None, refits: int = LATENCY_REFITS, limits: str = "",
                   advice: str = "") -> tuple[Measured[C], LatencyCheck]:
    """Measure the chosen candidate (``start``, else ``refit()``) end to end against the latency
    target; on a miss, correct the meter's predicted -> measured line (see the module doc;
    ``floor``: the family's most removing candidate) and ``refit()``, at most ``refits`` times.
    Returns the candidate within LATENCY_TOLERANCE and its check, or raises LatencyError naming the
    closest kept latency measured."""
    goal, tol = meter.target.value, meter.target.tolerance
    best = start if start is not None else refit()
    tried: list[tuple[Measured[C], LatencyCheck]] = []
    seen: set[Hashable] = set()
    for i in range(refits + 1):
        tried.append((best, _check(meter, best, i)))
        seen.add(meter.key(best.candidate))
        if abs(tried[-1][1].measured - goal) <= tol or i == refits:
            break
        if not _recorrect(meter, [(c.predicted, c.measured) for _, c in tried], floor):
            break  # pruning measured no faster than dense: no line to correct with
        try:
            best = refit()
        except BudgetError:
            break  # the corrected goal is out of the family's reach: report what was measured
        if meter.key(best.candidate) in seen:
            break  # the correction picks a candidate already measured: the family is too coarse here
    best, check = min(tried, key=lambda mc: abs(mc[1].measured - goal))
    if check.met:
        return best, check
    at_floor = floor is not None and meter.key(best.candidate) == meter.key(floor.candidate)
    why = f"; this is the smallest reachable fraction{limits}" if at_floor else advice
    raise LatencyError(f"cannot reach {meter.target.describe()} within {tol:.0%}: the closest kept latency "
                       f"measured is {check.measured:.4f} (predicted {check.predicted:.4f}, {check.pruned_ms:.3g} "
                       f"of {check.dense_ms:.3g} ms, after {len(tried) - 1} refit(s)){why}", None, check)


def _recorrect(meter: BudgetMeter, points: list[tuple[float, float]], floor: Measured | None) -> bool:
    """Set the meter's line from the (predicted, measured) kept latencies so far and the dense
    model's (1, 1): with points on both sides of the target, the false-position line through the
    bracket's ends (or its midpoint when the last two points fell on one side: a step that does
    not shrink the bracket is halved); else from (1, 1) through the lowest point, aimed no
    further than the floor."""
    goal = meter.target.value
    above = [q for q in [(1.0, 1.0), *points] if q[1] > goal]
    below = [q for q in points if q[1] <= goal]
    hi = min(above, key=lambda q: q[0])
    lo = max(below, key=lambda q: q[0]) if below else None
    if lo is not None and lo[0] < hi[0] and lo[1] < hi[1]:
        stuck = len(points) >= 2 and (points[-1][1] > goal) == (points[-2][1] > goal)
        meter.correct(hi, ((lo[0] + hi[0]) / 2, goal) if stuck else lo)
        return True
    last = points[-1]
    if not last[0] < 1.0 or not last[1] < 1.0:
        return False
    meter.correct((1.0, 1.0), last)
    if floor is not None and meter.latency is not None and floor.predicted is not None:
        p_floor = floor.predicted / meter.latency.dense_units
        if meter.predicted_goal() < p_floor < hi[0]:  # aim at the floor: measuring it brackets the goal
            meter.correct(hi, (p_floor, goal))
    return True


def _check(meter: BudgetMeter[C], m: Measured[C], refits: int) -> LatencyCheck:
    lat = meter.latency
    assert lat is not None and m.predicted is not None
    kept, dense_ms, ms = meter.measure_end_to_end(m.candidate)
    predicted = m.predicted / lat.dense_units  # uncorrected
    return LatencyCheck(meter.target.value, kept, predicted, meter.correction, meter.anchor, refits, dense_ms, ms,
                        predicted * dense_ms, len(lat.table), lat.entries_measured, lat.table.backend.value,
                        lat.table.batch, lat.table.threads)
