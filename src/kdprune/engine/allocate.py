"""Allocation: turn per-channel scores into a pruning plan (which channels of which group to
remove), either uniformly per group or with one global threshold over normalised scores."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence, Union

import torch

from kdprune.engine.graph import ChannelGroup
from kdprune.registry import check_choice, choice

__all__ = ["PruningPlan", "plan_pruning", "round_width", "width_step", "lowest_channels", "MODES", "MinWidth",
           "WidthFloor", "floor_of",
           "Allocation", "AnyAllocation", "Uniform", "Global", "Shaped"]


@choice("uniform")
@dataclass(frozen=True)
class Uniform:
    """The same fraction of every group (PFEC, Li et al. 2017), dithered to within one channel."""

    def keeps(self, groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
              ratio: float) -> list[int]:
        """Kept width of each group at allocation ratio ``ratio``."""
        return _uniform_keep(groups, ratio)


@choice("global")
@dataclass(frozen=True)
class Global:
    """One threshold over all channels' mean-normalised scores: groups get adaptive widths."""

    def keeps(self, groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
              ratio: float) -> list[int]:
        """Kept width of each group at allocation ratio ``ratio``."""
        return _global_keep(groups, scores, ratio)


@choice("shaped")
@dataclass(frozen=True)
class Shaped:
    """Uniform with a per-group multiplier: group ``root`` loses ``min(1, ratio * w)`` of its
    channels (groups not listed: w = 1, so ``Shaped()`` is ``Uniform()``); the candidate
    allocations an adaptive-BN search draws."""

    weights: tuple[tuple[str, float], ...] = ()

    def keeps(self, groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
              ratio: float) -> list[int]:
        """Kept width of each group at allocation ratio ``ratio``."""
        w, n = dict(self.weights), len(groups)
        return [g.channels - int(math.floor(min(1.0, ratio * w.get(g.root, 1.0)) * g.channels + (i + 0.5) / n))
                for i, g in enumerate(groups)]


Allocation = Union[Uniform, Global]  # what a recipe's ``mode`` chooses from
MODES = (Uniform, Global)
# what plan_pruning takes: also the drawn allocations of a search (kdprune.engine.adaptive)
AnyAllocation = Union[Uniform, Global, Shaped]


@dataclass(frozen=True)
class PruningPlan:
    """Group root FQN -> sorted channel indices (root numbering) to REMOVE."""

    removals: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {str(k): tuple(sorted({int(i) for i in v})) for k, v in self.removals.items()}
        object.__setattr__(self, "removals", clean)

    def __getitem__(self, root: str) -> tuple[int, ...]:
        return self.removals[root]

    def __iter__(self) -> Iterator[str]:
        return iter(self.removals)

    def __len__(self) -> int:
        return len(self.removals)

    def __contains__(self, root: object) -> bool:
        return root in self.removals

    def items(self):
        """(root, idxs) pairs."""
        return self.removals.items()

    @property
    def num_removed(self) -> int:
        """Total number of channels removed over all groups."""
        return sum(len(v) for v in self.removals.values())

    def to_dict(self) -> dict[str, list[int]]:
        """JSON-ready dict."""
        return {k: list(v) for k, v in self.removals.items()}


@dataclass(frozen=True)
class MinWidth:
    """The fewest channels a group may keep: ``default`` everywhere, and for a group whose output
    layers include one that ``layers`` names (module name or fnmatch glob -> channels), the largest
    such floor (Torch-Pruning users set this per layer to keep a stem or a bottleneck wide)."""

    default: int = 1
    layers: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for name, n in (("default", self.default), *self.layers):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"min width of {name!r} must be an int >= 1, got {n!r}")

    def of(self, group: ChannelGroup) -> int:
        """This group's floor."""
        # only layers whose *output* channels are the group's: a consumer's width is another group's
        outs = [m.name for m in group.members if m.role == "out"]
        hits = [n for pattern, n in self.layers if any(fnmatch.fnmatchcase(o, pattern) for o in outs)]
        return max([self.default, *hits])


#: A floor on kept widths: one count for every group, or per layer (MinWidth).
WidthFloor = Union[int, MinWidth]


def floor_of(min_width: WidthFloor, group: ChannelGroup) -> int:
    """The fewest channels ``group`` may keep under ``min_width``."""
    return min_width.of(group) if isinstance(min_width, MinWidth) else min_width


def round_width(keep: int, channels: int, min_width: int = 1, round_to: int | None = None) -> int:
    """Clamp a kept width to [min_width, channels] and, with ``round_to``, round a pruned width to
    the nearest multiple inside that range (unpruned groups, or groups where no multiple fits,
    keep their full width)."""
    lo = min(max(1, min_width), channels)
    keep = max(lo, min(channels, keep))
    if not round_to or round_to <= 1 or keep == channels:
        return keep
    first = math.ceil(lo / round_to) * round_to
    if first > channels:
        return channels  # no legal multiple: leave the group alone rather than break the rule
    last = (channels // round_to) * round_to
    nearest = int(math.floor(keep / round_to + 0.5)) * round_to
    return max(first, min(last, nearest))


def _check(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor], ratio: float,
           mode: AnyAllocation, min_width: WidthFloor, round_to: int | None) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    check_choice(mode, AnyAllocation, "mode")
    if isinstance(min_width, int) and min_width < 1:  # a MinWidth checks itself
        raise ValueError(f"min_width must be >= 1, got {min_width}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be a positive int or None, got {round_to}")
    for g in groups:
        if g.root not in scores:
            raise ValueError(f"no scores for group {g.root!r}")
        if scores[g.root].numel() != g.channels:
            raise ValueError(
                f"scores for {g.root!r} have {scores[g.root].numel()} entries, group has {g.channels}"
            )


def _uniform_keep(groups: Sequence[ChannelGroup], ratio: float) -> list[int]:
    # Dither the fractional part across groups: each group removes floor or ceil of ratio*C, so the
    # fraction stays the same per group to within one channel while the overall width moves one
    # channel at a time as the ratio grows (which the FLOPs/params target search relies on).
    n = len(groups)
    return [g.channels - int(math.floor(ratio * g.channels + (i + 0.5) / n))
            for i, g in enumerate(groups)]


def _normalised(s: torch.Tensor) -> torch.Tensor:
    # Divide by the group mean so groups with differently scaled weights compete fairly.
    s = s.detach().double().flatten()
    return s / s.mean().clamp_min(1e-12)


def _global_keep(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                 ratio: float) -> list[int]:
    flat = torch.cat([_normalised(scores[g.root]) for g in groups])
    owner = torch.cat([torch.full((g.channels,), i) for i, g in enumerate(groups)])
    k = int(round(ratio * flat.numel()))
    order = torch.sort(flat, stable=True).indices[:k]
    removed = torch.bincount(owner[order], minlength=len(groups))
    return [g.channels - int(removed[i]) for i, g in enumerate(groups)]


def plan_pruning(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    mode: AnyAllocation = Uniform(),
    min_width: WidthFloor = 1,
    round_to: int | None = None,
) -> PruningPlan:
    """Remove the lowest-scored channels: ``ratio`` of each group (``Uniform()``, as in PFEC, Li et
    al. 2017) or of all channels under one threshold on mean-normalised scores (``Global()``)."""
    _check(groups, scores, ratio, mode, min_width, round_to)
    if not groups:
        return PruningPlan({})
    keeps = mode.keeps(groups, scores, ratio)
    removals = {}
    for g, keep in zip(groups, keeps):
        keep = round_width(keep, g.channels, floor_of(min_width, g), width_step(g, round_to))
        if keep < g.channels:
            removals[g.root] = lowest_channels(g, scores[g.root], g.channels - keep)
    return PruningPlan(removals)


def width_step(group: ChannelGroup, round_to: int | None) -> int | None:
    """The step a group's kept width moves in: ``round_to``, and a multiple of the channels a
    grouped conv ties together (None: any width)."""
    step = math.lcm(group.tie_size, round_to or 1)
    return step if step > 1 else None


def lowest_channels(group: ChannelGroup, scores: torch.Tensor, n: int) -> tuple[int, ...]:
    """The ``n`` lowest-scored channels of ``group`` (whole tie classes, ranked by their summed
    score, when grouped convs tie channels), keeping every producer at least one channel."""
    s = scores.detach().double().flatten()
    if not group.ties:
        order = torch.sort(s, stable=True).indices
        return tuple(sorted(_protect_members(group, s, {int(i) for i in order[:n]})))
    # mean score per class (the sum, for the equal classes of a grouped conv); classes that differ
    # in size (a linked group) are taken while they fit, so exactly n go whenever sizes allow
    means = torch.stack([s[list(c)].mean() for c in group.ties])
    removed: set[int] = set()
    for k in torch.sort(means, stable=True).indices.tolist():
        if len(removed) + len(group.ties[k]) <= n:
            removed.update(group.ties[k])
    removed = _protect_members(group, s, removed)
    return tuple(sorted(i for c in group.ties if set(c) <= removed for i in c))


def _protect_members(group: ChannelGroup, scores: torch.Tensor, removed: set[int]) -> set[int]:
    """A group spanning a concat feeds several producers, each owning a slice of its channels;
    keep each producer's best channel so no layer is pruned to zero width."""
    for m in group.producers:
        own = set(m.root_idxs)
        if own and own <= removed:
            removed.discard(max(own, key=lambda i: (float(scores[i]), -i)))
    return removed
