"""Width policies: which kept widths a pruned channel group may take.

``FreeWidths()`` allows any width, ``RoundTo(n)`` multiples of ``n`` (the ``round_to`` rule), and
``MeasuredWidths(backend, batch)`` the widths the per-layer latency table measures as *locally
fastest* for each group: width w is kept when every wider width within ``window`` channels is
measured slower. Rounding a planned width up to the next such width never costs measured latency
(by induction over the widths in between, each is at least as slow as some wider width within the
window, and the chain ends at a fast width no slower than the planned one) and keeps at least the
planned channels; the budget service's neighbour moves (one group down to its next fast width)
then land a FLOPs/params target within 1% as with ``round_to``.

A group's latency curve is measured on the dense model with only that group narrowed: every width
is one physically pruned copy whose layers the table times once per layer shape (so the cost is
one edit per channel of the network, and the timing is shared by groups of equal shape).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from kdprune.engine.allocate import PruningPlan, WidthFloor, floor_of, lowest_channels, width_step
from kdprune.engine.graph import ChannelGroup
from kdprune.engine.prune import apply_plan
from kdprune.metrics import Backend, LatencyTable, shared_table
from kdprune.registry import check_choice, choice

__all__ = ["FreeWidths", "RoundTo", "MeasuredWidths", "WidthPolicy", "WIDTH_POLICIES", "fast_widths",
           "measured_widths", "snap_plan", "LegalSteps", "width_table"]


@choice("free")
@dataclass(frozen=True)
class FreeWidths:
    """Any kept width (down to ``min_width``)."""


@choice("round_to")
@dataclass(frozen=True)
class RoundTo:
    """Pruned widths are multiples of ``n`` (the same rule as ``round_to=n``)."""

    n: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"RoundTo.n must be an integer >= 1, got {self.n!r}")


@choice("measured")
@dataclass(frozen=True)
class MeasuredWidths:
    """Widths measured locally fastest per group on ``backend`` at ``batch`` (None: the latency
    target's backend/batch, else eager at batch 1); ``window``: how many wider widths a fast
    width must beat."""

    backend: Backend | None = None
    batch: int | None = None
    window: int = 16

    def __post_init__(self) -> None:
        if self.backend is not None:
            check_choice(self.backend, Backend, "MeasuredWidths.backend")
        if self.batch is not None and self.batch < 1 or self.window < 1:
            raise ValueError("MeasuredWidths needs batch >= 1 (or None) and window >= 1")


WidthPolicy = Union[FreeWidths, RoundTo, MeasuredWidths]
WIDTH_POLICIES = (FreeWidths, RoundTo, MeasuredWidths)


def width_table(policy: MeasuredWidths, backend: Backend | None = None, batch: int | None = None) -> LatencyTable:
    """The shared latency table ``policy`` measures on (its own backend/batch, else the given ones)."""
    return shared_table(policy.backend or backend or Backend.EAGER, policy.batch or batch or 1)


def fast_widths(latency: Mapping[int, float], window: int) -> tuple[int, ...]:
    """Widths (keys) measured faster than every wider width within ``window`` channels, ascending;
    the widest width is always one."""
    ws = sorted(latency)
    return tuple(w for w in ws if all(latency[v] > latency[w] for v in ws if w < v <= w + window))


def _candidates(group: ChannelGroup, min_width: WidthFloor) -> list[int]:
    step = width_step(group, None) or 1
    lo = min(max(1, floor_of(min_width, group)), group.channels)
    return sorted({w for w in range(lo, group.channels) if w % step == 0} | {group.channels})


def _group_curve(model: nn.Module, x: torch.Tensor, group: ChannelGroup, scores: torch.Tensor,
                 widths: Sequence[int], table: LatencyTable) -> dict[int, float]:
    """Table latency of the whole model with only ``group`` narrowed to each width (other layers
    are equal across widths, so differences are the group's own)."""
    calls = {}
    for w in widths:
        m = copy.deepcopy(model)
        if w < group.channels:
            apply_plan(m, x, PruningPlan({group.root: lowest_channels(group, scores, group.channels - w)}), [group])
        calls[w] = table.calls(m, x)
    table.lookup([c for cs in calls.values() for c in cs])  # every missing entry in one interleaved batch
    return {w: sum(table.lookup(cs)) for w, cs in calls.items()}


def measured_widths(model: nn.Module, x: torch.Tensor, groups: Sequence[ChannelGroup],
                    scores: Mapping[str, torch.Tensor], policy: MeasuredWidths, table: LatencyTable,
                    min_width: WidthFloor = 1) -> dict[str, tuple[int, ...]]:
    """Group root -> its fast widths (see the module doc), each measured with ``table``."""
    with torch.random.fork_rng(devices=[]):  # tracing the copies must not move the caller's RNG
        return {g.root: fast_widths(_group_curve(model, x, g, scores[g.root], _candidates(g, min_width), table),
                                    policy.window) for g in groups}


def _with_width(plan: Mapping[str, tuple[int, ...]], group: ChannelGroup, scores: torch.Tensor,
                width: int) -> dict[str, tuple[int, ...]]:
    out = {k: v for k, v in plan.items() if k != group.root}
    if width < group.channels:
        out[group.root] = lowest_channels(group, scores, group.channels - width)
    return out


def snap_plan(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor], plan: PruningPlan,
              legal: Mapping[str, Sequence[int]]) -> PruningPlan:
    """``plan`` with every group's kept width rounded up to its next legal width (monotone: a
    family of plans stays one)."""
    out = dict(plan.removals)
    for g in groups:
        keep = g.channels - len(plan.removals.get(g.root, ()))
        width = min(w for w in legal[g.root] if w >= keep)
        out = _with_width(out, g, scores[g.root], width)
    return PruningPlan(out)


class LegalSteps:
    """Neighbour moves for the budget service: narrow one group to its next narrower legal width
    (its lowest-score channels), so some groups round down and the rest up."""

    def __init__(self, groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                 legal: Mapping[str, Sequence[int]]) -> None:
        self.groups, self.scores, self.legal = list(groups), scores, legal

    def __call__(self, plan: PruningPlan, over: bool) -> list[list[PruningPlan]]:
        """One tier: every group's one-step-narrower plan (the search starts above the target)."""
        cands = []
        for g in self.groups:
            keep = g.channels - len(plan.removals.get(g.root, ()))
            below = [w for w in self.legal[g.root] if w < keep]
            if below:
                cands.append(PruningPlan(_with_width(plan.removals, g, self.scores[g.root], max(below))))
        return [cands]
