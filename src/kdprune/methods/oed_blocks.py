"""OED's whole blocks (Wang et al., IEEE Access 2019, ours for targets): each block's removal cost,
the sets of whole blocks of least total mask that meet a target, the commit of one such set during
the cycle (``BlockCommit``), and the depth goal of a target between block counts (the rest is met
by channels, ``kdprune.methods.oed``)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from kdprune.engine import TOLERANCE, BudgetError, BudgetMeter, LatencyCheck, Target, apply_edit, verify_latency
from kdprune.training.callbacks import Callback, LoopState
from kdprune.training.prox import FistaL1

__all__ = ["BlockCommit", "FistaDecides", "block_costs", "check_block_target", "choose_blocks", "commit_goal",
           "depth_goal", "select_blocks"]


def _removal(model: nn.Module, x: Tensor, blocks: frozenset[str]) -> None:
    for b in sorted(blocks):
        apply_edit(model, {"op": "remove_block", "module": b}, x)


def select_blocks(model: nn.Module, x: Tensor, sites: dict[str, str], values: Tensor,
                  target: Target | None) -> frozenset[str]:
    """Blocks to remove: every zero-mask block and, for a target, the other blocks of least total
    mask whose removal lands within 1% of it (see ``choose_blocks``)."""
    return choose_blocks(model, x, sites, values, target)[0]


def choose_blocks(model: nn.Module, x: Tensor, sites: dict[str, str], values: Tensor, target: Target | None
                  ) -> tuple[frozenset[str], LatencyCheck | None]:
    """``select_blocks`` and, for a latency target, its end-to-end check: each block's cost is
    measured once by the budget service's meter; removal costs add up, so a subset-sum search finds
    the set; the chosen set is measured again physically (latency: end to end, refitted with the
    measured/predicted correction when it misses by more than 5%)."""
    names = list(sites)
    zero = frozenset(b for b, v in zip(names, values.tolist()) if v == 0.0)
    if target is None:
        return zero, None
    meter: BudgetMeter[frozenset[str]] = BudgetMeter(model, x, target, apply=_removal)
    mask = dict(zip(names, values.tolist()))
    if meter.latency is None:
        return _pick(meter, zero, names, mask), None
    best, check = verify_latency(meter, lambda: meter.measure(_pick(meter, zero, names, mask)),
                                 limits=" with whole blocks", advice="; use another target or lam alone")
    return best.candidate, check


def _pick(meter: BudgetMeter[frozenset[str]], zero: frozenset[str], names: list[str], mask: dict[str, float]
          ) -> frozenset[str]:
    """The least-mask set of blocks (with every zero-mask one) that the meter says meets the target."""
    target, tol = meter.target, meter.target.tolerance
    base, goal = meter.kept(zero), target.value
    if base < goal - tol:
        raise BudgetError(f"OED: the {len(zero)} blocks whose masks reached 0 already leave {base:.4f} of "
                          f"{target.metric}, below the target {goal}: lower lam", None)
    cost = {b: base - meter.kept(zero | {b}) for b in names if b not in zero}
    for extra in _subsets_near(cost, mask, base - goal, tol):
        cand = zero | extra
        if abs(meter.kept(cand) - goal) <= tol:
            return cand
    reach = sorted({round(base - sum(cost[b] for b in c), 4) for c in _subsets_near(cost, mask, base - goal, 1.0)})
    how = " (predicted)" if meter.latency is not None else ""
    raise BudgetError(f"OED: no set of whole blocks keeps {goal} of {target.metric} within {tol:.0%} "
                      f"(nearest reachable{how}: {reach[:6]}); use another target or lam alone", None)


def _subsets_near(cost: dict[str, float], mask: dict[str, float], need: float, window: float = TOLERANCE,
                  limit: int = 20) -> list[frozenset[str]]:
    """Up to ``limit`` subsets whose summed cost is within ``window`` of ``need``, least total mask
    first (a dynamic programme over costs rounded to 1/2000 of the dense model that keeps the
    ``limit`` least-mask subsets of each cost: blocks of one stage cost the same, and a judge of
    the sets needs more than the least-mask one of them)."""
    res = 1 / 2000
    best: dict[int, list[tuple[float, frozenset[str]]]] = {0: [(0.0, frozenset())]}
    for b, c in cost.items():
        step = round(c / res)
        for k, subs in list(best.items()):
            grown = best.get(k + step, []) + [(m + mask[b], sub | {b}) for m, sub in subs]
            best[k + step] = sorted(grown, key=lambda t: (t[0], sorted(t[1])))[:limit]
    near = [t for k, subs in best.items() if abs(k * res - need) <= window for t in subs]
    return [sub for _, sub in sorted(near, key=lambda t: (t[0], sorted(t[1])))][:limit]


def check_block_target(costs: dict[str, float], goal: float, tolerance: float, metric: str) -> None:
    """ValueError before any training, naming the nearest kept fractions whole blocks reach, when no
    set of blocks keeps ``goal`` within ``tolerance`` (was: found at the commit, mid-cycle)."""
    if _blocks_reach(costs, goal, tolerance):
        return
    kept = _reachable(costs)
    below, above = [k for k in kept if k < goal], [k for k in kept if k > goal]
    near = ", ".join(f"{k:g}" for k in (below[-1:] + above[:1]))
    raise ValueError(f"OED: no set of whole blocks keeps {goal:g} of the {metric} within {tolerance:.0%}; the "
                     f"nearest reachable fractions are {near}: give one of them, or width=True (channels do "
                     "the rest)")


class BlockCommit(Callback):
    """For a target: per replica, fix the blocks to remove during the cycle (at ``commit_at`` of
    its steps, or once the zero masks alone reach the target), ramp their masks linearly to 0 over
    ``ramp`` of the steps and stop shrinking the others (their lam -> 0 in ``fista``)."""

    def __init__(self, fista: FistaL1, masks: nn.Parameter, costs: dict[str, float], goal: float,
                 commit_at: float, ramp: float, tolerance: float = TOLERANCE,
                 judge: Callable[[int, list[frozenset[str]]], list[float]] | None = None, judged: int = 1) -> None:
        self.fista, self.masks, self.names = fista, masks, list(costs)
        self.costs, self.goal, self.commit_at, self.ramp = costs, goal, commit_at, ramp
        self.tolerance, self.judge, self.judged = tolerance, judge, judged
        self.scores: list[list[dict[str, Any]] | None] = [None] * masks.shape[0]  # the judge's, per replica
        self.chosen: list[list[str] | None] = [None] * masks.shape[0]
        self.start: list[Tensor | None] = [None] * masks.shape[0]  # mask values at commit
        self.at = [0] * masks.shape[0]  # step of the commit

    def _kept(self, blocks: Sequence[str]) -> float:
        return 1.0 - sum(self.costs[b] for b in blocks)  # removal costs add up (see select_blocks)

    def _commit(self, k: int, step: int) -> None:
        mask = dict(zip(self.names, self.masks[k].tolist()))
        near = _subsets_near(self.costs, mask, 1.0 - self.goal, self.tolerance)
        if not near:
            raise ValueError(f"OED: no set of whole blocks keeps {self.goal} within {self.tolerance:.0%}")
        pick = near[0]
        if self.judge is not None:  # the first of equal scores: the least-mask set wins ties
            sets = near[:self.judged]
            top1 = self.judge(k, sets)
            pick = sets[max(range(len(sets)), key=lambda i: (top1[i], -i))]
            self.scores[k] = [{"blocks": sorted(s), "top1": t} for s, t in zip(sets, top1)]
        self.chosen[k], self.start[k], self.at[k] = sorted(pick), self.masks[k].detach().clone(), step
        lam = self.fista.lams[0]
        lam = lam.clone() if isinstance(lam, Tensor) else torch.full_like(self.masks, lam)
        lam[k] = 0.0  # the kept blocks stop shrinking; the chosen ones follow the ramp below
        self.fista.set_lam(lam)

    @torch.no_grad()
    def on_optimizer_step(self, state: LoopState) -> None:
        """After FISTA's step: commit where due, then hold the chosen masks under their ramp."""
        total = state.steps_per_epoch * state.epochs
        for k in range(self.masks.shape[0]):
            zeros = [b for b, v in zip(self.names, self.masks[k].tolist()) if v == 0.0]
            if self.chosen[k] is None and (state.step >= self.commit_at * total
                                           or self._kept(zeros) <= self.goal + self.tolerance):
                self._commit(k, state.step)
            if self.chosen[k] is not None:
                self._ramp(k, state.step, total)

    def _ramp(self, k: int, step: int, total: int) -> None:
        """Cap replica ``k``'s committed masks by their values at commit, falling linearly to 0."""
        frac = 1.0 - (step - self.at[k]) / max(1.0, self.ramp * total)
        idx = [self.names.index(b) for b in self.chosen[k]]
        cap = self.start[k][idx] * max(0.0, frac)
        self.masks[k, idx] = torch.minimum(self.masks[k, idx], cap.to(self.masks.device))

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "at": self.at, "scores": self.scores,
                "start": [s.clone() if s is not None else None for s in self.start]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chosen, self.at = [list(c) if c is not None else None for c in state["chosen"]], list(state["at"])
        self.scores = list(state.get("scores", self.scores))
        self.start = [s.clone() if s is not None else None for s in state["start"]]


def block_costs(model: nn.Module, x: Tensor, sites: dict[str, str], target: Target) -> dict[str, float]:
    """Each block's removal cost (fraction of the dense metric), measured on an edited copy."""
    meter: BudgetMeter[frozenset[str]] = BudgetMeter(model, x, target, apply=_removal)
    return {b: 1.0 - meter.kept(frozenset({b})) for b in sites}


def commit_goal(model: nn.Module, x: Tensor, sites: dict[str, str], target: Target) -> float:
    """The kept fraction BlockCommit aims for with ``block_costs``: the target's, or for latency
    the predicted one that the measured/predicted correction, found by a block set meeting the
    target end to end, maps onto the target (so an unreachable latency target fails before
    the cycle, not after it)."""
    if target.latency is None:
        return target.value
    meter: BudgetMeter[frozenset[str]] = BudgetMeter(model, x, target, apply=_removal)
    names = list(sites)
    verify_latency(meter, lambda: meter.measure(_pick(meter, frozenset(), names, dict.fromkeys(names, 1.0))),
                   limits=" with whole blocks", advice="; use another target or lam alone")
    return meter.predicted_goal()  # BlockCommit sums the raw (uncorrected) costs


def _blocks_reach(costs: dict[str, float], goal: float, tolerance: float) -> bool:
    """Whether some set of whole blocks keeps ``goal`` within ``tolerance`` (removal costs add up)."""
    return bool(_subsets_near(costs, dict.fromkeys(costs, 1.0), 1.0 - goal, tolerance, limit=1))


def _reachable(costs: dict[str, float]) -> list[float]:
    """Every kept fraction whole blocks reach (costs add up; rounded to 1/2000 of the dense model)."""
    res, sums = 1 / 2000, {0}
    for c in costs.values():
        sums |= {k + round(c / res) for k in sums}
    return sorted({round(1.0 - k * res, 4) for k in sums})


def depth_goal(costs: dict[str, float], goal: float, tolerance: float) -> float:
    """What whole blocks aim for under a target of ``goal``: ``goal`` itself where a set of blocks keeps
    it within ``tolerance``, else the nearest fraction they keep above it (channels do the rest)."""
    if _blocks_reach(costs, goal, tolerance):
        return goal
    return min(k for k in _reachable(costs) if k > goal)


#: The mask a block FISTA had zeroed comes back with when the fitting set leaves it out (alive, small).
REVIVED = 1e-2


class FistaDecides(BlockCommit):
    """For a target, FISTA decides which blocks go (ours, issue 30): per replica, lam grows by
    ``growth`` every tenth of the cycle until the blocks whose masks FISTA zeroed keep between ``low``
    and ``goal + tolerance`` of the metric; those are then held at zero and the other masks stop
    shrinking. Blocks zeroed in a step that overshoots are revived (largest previous mask first)
    until the set fits. A replica still undecided at ``commit_at`` of the cycle falls back to
    BlockCommit's least-mask set, and ``fallback`` says so."""

    def __init__(self, fista: FistaL1, masks: nn.Parameter, costs: dict[str, float], goal: float, low: float,
                 commit_at: float, ramp: float, tolerance: float = TOLERANCE, growth: float = 10.0, **judging: Any):
        super().__init__(fista, masks, costs, goal, commit_at, ramp, tolerance, **judging)
        self.low, self.growth = low, growth
        self.fallback = [False] * masks.shape[0]
        self.prev = masks.detach().clone()
        lam = fista.lams[0]
        self.lam = (lam.clone() if isinstance(lam, Tensor) else torch.full_like(masks, lam)).clamp_min(1e-3)

    def _fit(self, k: int, zeros: list[str]) -> list[str] | None:
        """The zero set to hold: ``zeros`` if it fits, else (an overshoot: FISTA zeroed too many in
        one step) the subset of them that fits with the least total mask before this step (blocks
        zeroed earlier first: FISTA's verdict, then the least-mask of this step's new zeros)."""
        high = self.goal + self.tolerance
        if self.low <= self._kept(zeros) <= high:
            return zeros
        prev = {b: float(self.prev[k, self.names.index(b)]) for b in zeros}
        found = _subsets_near({b: self.costs[b] for b in zeros}, prev, 1.0 - (self.low + high) / 2,
                              (high - self.low) / 2, limit=1)
        return sorted(found[0]) if found else None

    def _decide(self, k: int, zeros: list[str], step: int) -> bool:
        """Hold the fitting zero set; this step's other new zeros come back to their previous values
        (all of them when nothing fits: lam keeps growing)."""
        fit = self._fit(k, zeros)
        held = set(fit) if fit is not None else {b for b in zeros if self.prev[k, self.names.index(b)] == 0}
        for b in set(zeros) - held:  # back to where it was (a block zeroed earlier: barely alive)
            self.masks[k, self.names.index(b)] = max(float(self.prev[k, self.names.index(b)]), REVIVED)
        if fit is None:
            return False
        self.chosen[k], self.start[k], self.at[k] = sorted(fit), self.masks[k].detach().clone(), step
        self.lam[k] = 0.0  # the kept blocks stop shrinking
        self.fista.set_lam(self.lam)
        return True

    @torch.no_grad()
    def on_optimizer_step(self, state: LoopState) -> None:
        """After FISTA's step: decide where the zero masks fit, grow lam where they do not yet, fall
        back at the deadline; decided blocks stay at zero."""
        total = state.steps_per_epoch * state.epochs
        rate = self.growth ** (1.0 / max(1.0, 0.1 * total))
        for k in range(self.masks.shape[0]):
            if self.chosen[k] is None:
                zeros = [b for b, v in zip(self.names, self.masks[k].tolist()) if v == 0.0]
                fits = self._kept(zeros) <= self.goal + self.tolerance and self._decide(k, zeros, state.step)
                if not fits and state.step >= self.commit_at * total:
                    self.fallback[k] = True
                    self._commit(k, state.step)  # BlockCommit's least-mask set; its lam row goes to 0
                    self.lam[k] = 0.0
                elif not fits:
                    self.lam[k] *= rate
                    self.fista.set_lam(self.lam)
            if self.chosen[k] is not None and not self.fallback[k]:
                self.masks[k, [self.names.index(b) for b in self.chosen[k]]] = 0.0
            elif self.fallback[k]:  # BlockCommit's ramp, for the replicas that fell back to it
                self._ramp(k, state.step, total)
        self.prev = self.masks.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fallback": list(self.fallback), "prev": self.prev.clone(),
                "lam": self.lam.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fallback, self.prev, self.lam = list(state["fallback"]), state["prev"].clone(), state["lam"].clone()
