"""SDAP's channel ranking and budget (Diao et al., Pattern Recognition 2024): which channels a
masked rate masks (the paper's global |gate| ranking weighted by each channel's cost, or uniform
rates), the min-width rule, and the kept fraction after physical removal, measured by the
engine's budget service. The training side (gates, ramp, removal) is in ``kdprune.methods.sdap``."""
from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from kdprune.engine import (
    AnyAllocation,
    Bisection,
    BudgetFit,
    BudgetMeter,
    ChannelGroup,
    Global,
    LatencyCheck,
    Member,
    PruningPlan,
    Refine,
    Target,
    WidthFloor,
    apply_plan,
    bisect_budget,
    floor_of,
    plan_key,
    plan_pruning,
    search_budget,
    verify_latency,
)
from kdprune.metrics import layer_table

__all__ = ["SDAPController", "channel_costs", "global_keep", "protected_channels", "keep_to_plan"]

# The final rate: 30 halvings (far finer than one channel's share), keeping the closer bracket end;
# then single-channel moves or cross-group swaps (ours) for coarse networks.
_BISECTION = Bisection(steps=30, first_within=False)
_REFINE = Refine(rounds=16)


def channel_costs(model: nn.Module, groups: Sequence[ChannelGroup], metric: str,
                  example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Params or FLOPs each channel carries (SDAP ranking weights): its share of every coupled
    producer (output slice) and consumer (input slice), in root channel order."""
    table = {r["name"]: r for r in layer_table(model, example_input=example_input)}
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        w = torch.zeros(g.channels, dtype=torch.float64)
        produced = {m.name for m in g.members if m.role == "out"}
        for m in g.members:
            row = table.get(m.name)
            if row is None or not m.root_idxs or (m.role == "in" and m.name in produced):
                continue
            width = row["out"] if m.role == "out" else row["in"]
            if width:
                idx = torch.tensor(m.root_idxs, dtype=torch.long)
                w.index_add_(0, idx, torch.full((len(idx),), _cost(model, m, row, metric) / width,
                                                dtype=torch.float64))
        out[g.root] = w
    return out


def _cost(model: nn.Module, m: Member, row: Mapping[str, Any], metric: str) -> float:
    """A member's cost to share over its channels: a consumer's params are its weight only
    (its bias does not shrink with its inputs)."""
    if metric == "params" and m.role == "in":
        return float(model.get_submodule(m.name).weight.numel())
    return float(row[metric])


def protected_channels(group: ChannelGroup, gate_abs: torch.Tensor, min_width: WidthFloor) -> torch.Tensor:
    """SDAP min-width rule: the ``min_width`` largest-|gate| channels of a group (and the best
    channel of each concat producer) are never masked; ties go to the higher index."""
    c, min_width = group.channels, floor_of(min_width, group)
    order = torch.sort(gate_abs.double().cpu(), stable=True).indices  # ascending
    prot = torch.zeros(c, dtype=torch.bool)
    prot[order[c - min(min_width, c):]] = True
    rank = torch.empty(c, dtype=torch.long)
    rank[order] = torch.arange(c)
    for m in group.producers:
        own = torch.tensor(sorted(set(m.root_idxs)), dtype=torch.long)
        if 0 < len(own) < c and not prot[own].any():
            prot[own[rank[own].argmax()]] = True
    return prot


def global_keep(groups: Sequence[ChannelGroup], gate_abs: Mapping[str, torch.Tensor],
                weights: Mapping[str, torch.Tensor], rate: float, min_width: WidthFloor = 1) -> dict[str, torch.Tensor]:
    """SDAP global ranking: mask the lowest-|gate| unprotected channels of the whole network while
    their summed weight stays <= rate * total weight; returns keep masks (True = keep)."""
    g_abs = torch.cat([gate_abs[g.root].detach().double().cpu() for g in groups])
    w = torch.cat([weights[g.root].double().cpu() for g in groups])
    prot = torch.cat([protected_channels(g, gate_abs[g.root], min_width) for g in groups])
    cand = (~prot).nonzero().flatten()
    order = cand[torch.sort(g_abs[cand], stable=True).indices]
    cum = torch.cumsum(w[order], 0)
    k = int(torch.searchsorted(cum, torch.tensor([rate * float(w.sum())], dtype=torch.float64),
                               right=True))
    keep = torch.ones(len(g_abs), dtype=torch.bool)
    keep[order[:k]] = False
    return dict(zip([g.root for g in groups], keep.split([g.channels for g in groups])))


def close_ties(groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``keep`` with every tie class (the channels a grouped conv removes together) masked only
    when all of it is masked, else kept whole: a per-channel ranking may split a class, which no
    physical cut can honour."""
    out = {r: k.clone() for r, k in keep.items()}
    for g in groups:
        for cls in g.ties:
            idx = list(cls)
            if not out[g.root][idx].all() and out[g.root][idx].any():
                out[g.root][idx] = True
    return out


def keep_to_plan(keep: Mapping[str, torch.Tensor]) -> PruningPlan:
    """Keep masks -> the engine's PruningPlan of masked channels."""
    return PruningPlan({r: (~k).nonzero().flatten().tolist() for r, k in keep.items() if not k.all()})


def _apply_keep(groups: Sequence[ChannelGroup], model: nn.Module, x: torch.Tensor,
                keep: Mapping[str, torch.Tensor]) -> None:
    apply_plan(model, x, keep_to_plan(keep), groups)


def _keep_key(keep: Mapping[str, torch.Tensor]) -> tuple:
    return plan_key(keep_to_plan(keep))


class SDAPController:
    """Masks for a rate (global or uniform) and the kept fraction after physical removal, measured
    by the engine's budget service on a gate-free copy (memoised per plan)."""

    def __init__(self, skeleton: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor,
                 target: Target, mode: AnyAllocation, min_width: WidthFloor = 1,
                 weight_by_cost: bool = True) -> None:
        self.skeleton, self.groups, self.x, self.target = skeleton, list(groups), example_input, target
        self.mode, self.min_width = mode, min_width
        metric = "flops" if target.metric == "latency" else target.metric  # latency: ranked by FLOPs share
        costs = channel_costs(skeleton, self.groups, metric, example_input) if weight_by_cost else None
        self.weights = costs or {g.root: torch.ones(g.channels, dtype=torch.float64) for g in self.groups}
        self.meter = BudgetMeter(skeleton, example_input, target, partial(_apply_keep, self.groups), _keep_key,
                                 max_cache=4096)
        self.dense_complexity = self.meter.dense
        self.dense = float(getattr(self.dense_complexity, metric))

    def keep_for(self, rate: float, gate_abs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep masks (True = keep) for masked rate ``rate`` given the gate magnitudes."""
        if isinstance(self.mode, Global):
            return close_ties(self.groups, global_keep(self.groups, gate_abs, self.weights, rate, self.min_width))
        scores = {r: v.detach().float().cpu() for r, v in gate_abs.items()}
        # uniform, or the per-group shape an adaptive-BN search chose (gates rank inside each group)
        plan = plan_pruning(self.groups, scores, min(max(rate, 0.0), 1.0), self.mode, self.min_width)
        keep = {g.root: torch.ones(g.channels, dtype=torch.bool) for g in self.groups}
        for root, idxs in plan.items():
            keep[root][list(idxs)] = False
        return keep

    def kept(self, keep: Mapping[str, torch.Tensor]) -> float:
        """Kept fraction of the target metric once the masked channels are physically removed."""
        return self.meter.kept(keep)

    def search(self, gate_abs: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """Bisection for the final rate whose masks keep the target fraction: (rate, kept)."""
        fit = bisect_budget(self.meter, lambda r: self.keep_for(r, gate_abs), _BISECTION)
        return fit.t, fit.best.kept

    def _move(self, keep: Mapping[str, torch.Tensor], gate_abs: Mapping[str, torch.Tensor],
              g: ChannelGroup, mask_more: bool) -> dict[str, torch.Tensor] | None:
        """``keep`` with one more channel of ``g`` masked (its lowest-|gate| unprotected one) or
        one unmasked (its highest-|gate| masked one); None when there is none."""
        k, s = keep[g.root], gate_abs[g.root].detach().double().cpu()
        pool = k & ~protected_channels(g, s, self.min_width) if mask_more else ~k
        idx = pool.nonzero().flatten()
        if len(idx) == 0:
            return None
        order = idx[torch.sort(s[idx], stable=True).indices]
        out = {r: v.clone() for r, v in keep.items()}
        for c in (order if mask_more else order.flip(0)).tolist():
            cls = next((list(t) for t in g.ties if c in t), [c])  # a grouped conv's channels move as a class
            if not mask_more or bool(pool[cls].all()):  # a class with a protected channel stays
                out[g.root][cls] = not mask_more
                return out
        return None

    def _neighbours(self, keep: Mapping[str, torch.Tensor], gate_abs: Mapping[str, torch.Tensor],
                    over: bool) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Tiers of moves towards the target: single moves, then (only when asked for) each single
        move followed by one opposite move in another group (a swap, finer than any one channel)."""
        singles = [(g, c) for g in self.groups if (c := self._move(keep, gate_abs, g, over)) is not None]
        yield [c for _, c in singles]
        yield [c2 for g, c in singles for h in self.groups
               if h.root != g.root and (c2 := self._move(c, gate_abs, h, not over)) is not None]

    def fit(self, gate_abs: Mapping[str, torch.Tensor]) -> BudgetFit:
        """The budget service's fit for these gates: the searched rate's masks, refined by single
        moves or cross-group swaps (ours, for coarse networks) if they miss by > 1%."""
        return search_budget(self.meter, lambda r: self.keep_for(r, gate_abs),
                             lambda k, over: self._neighbours(k, gate_abs, over), _BISECTION, _REFINE)

    def best_keep(self, gate_abs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float, float]:
        """Final masks for these gates, the rate they came from and their kept fraction."""
        fit = self.fit(gate_abs)
        return fit.best.candidate, fit.t, fit.best.kept

    def check_reachable(self, gate_abs: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """Search once and raise ValueError if the target cannot be met within 1%."""
        fit = self.fit(gate_abs)
        if not fit.met:
            raise ValueError(
                f"SDAP: {self.target.metric} target {self.target.value} cannot be met within "
                f"{self.target.tolerance:.0%} (closest kept fraction {fit.best.kept:.4f}, smallest reachable "
                f"{fit.floor.kept:.4f} under min_width={self.min_width}); choose another target or min_width")
        return fit.t, fit.best.kept

    def verify(self, keep: Mapping[str, torch.Tensor], gate_abs: Mapping[str, torch.Tensor]
               ) -> tuple[Mapping[str, torch.Tensor], LatencyCheck | None]:
        """For a latency target: ``keep`` measured end to end and, when it misses by more than 5%,
        refitted for these gates under the measured/predicted correction; else ``keep`` as it is."""
        if self.meter.latency is None:
            return keep, None
        best, check = verify_latency(self.meter, lambda: self.fit(gate_abs).best, self.meter.measure(keep),
                                     limits=f" under min_width={self.min_width}")
        return best.candidate, check
