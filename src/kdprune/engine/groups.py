"""The channel groups the engine prunes, each checked to prune exactly.

``kdprune.engine.links`` builds the groups from DepGraph (Fang et al. 2023) and the links the
engine owns (shuffles, slices, multipliers, grouped convs). On a model with a construct the
engine may not map exactly (a channel slice or reshape, a conv whose forward transforms its
weight, an op outside the known per-channel ones: a transpose across channels, an in-place write
into a slice), every open group is trial-pruned on a copy and compared with the same channels
zeroed on the dense model: a group whose pruning crashes or changes the function becomes a named
barrier (it stays whole, ``describe`` says why). Groups are trialled together and bisected, so a
model whose constructs all map exactly costs one extra trace.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import replace
from typing import Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.graph import _UNPRUNABLE, RESHAPE_ROOT, ChannelGroup, build_graph, invalid_member
from kdprune.engine.links import GroupStatus, raw_group_table
from kdprune.engine.masks import zero_channels
from kdprune.engine.prune import apply_plan

__all__ = ["group_table", "channel_groups", "EXACT_OPS", "TRIAL_BUDGET_S", "inexact_groups"]

_ROOTS = (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)

#: Autograd ops DepGraph maps channel for channel: a graph with nothing else (and no channel
#: reshape or slice, no conv that transforms its weight) skips the exactness trial.
EXACT_OPS = frozenset({
    "AddBackward0", "MulBackward0", "ReluBackward0", "HardtanhBackward0", "HardswishBackward0",
    "HardsigmoidBackward0", "SiluBackward0", "GeluBackward0", "SigmoidBackward0", "TanhBackward0",
    "LeakyReluBackward0", "EluBackward0", "MeanBackward1", "AvgPool2DBackward0", "MaxPool2DWithIndicesBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "CloneBackward0", "TBackward0",
})
_PLAIN_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward)


def _needs_trial(model: nn.Module, dg: tp.DependencyGraph) -> bool:
    if getattr(dg, "kdprune_stand_ins", ()):
        return True
    if any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and type(m).forward not in _PLAIN_FORWARDS
           for m in model.modules()):
        return True
    return any(n.type == ops.OPTYPE.ELEMENTWISE and n.grad_fn is not None and n.grad_fn.name() not in EXACT_OPS
               for n in dg.module2node.values())


def _trial_plan(groups: Sequence[ChannelGroup]) -> PruningPlan:
    """Every third tie class from the second on (at least one kept in every part of a group)."""
    removals = {}
    for g in groups:
        classes = g.ties or tuple((i,) for i in range(g.channels))
        chosen = {i for c in classes[1::3] for i in c}
        for p in g.parts:
            mine = {c for c in p.map if c >= 0}
            if mine and mine <= chosen and not p.root.startswith(RESHAPE_ROOT):  # a stand-in's piece may go whole
                chosen -= next(set(c) for c in classes if min(mine) in c)
        if chosen:
            removals[g.root] = sorted(chosen)
    return PruningPlan(removals)


def _trial(model: nn.Module, x: torch.Tensor, groups: Sequence[ChannelGroup]) -> str | None:
    """Why pruning these groups together is not exact (None: it is)."""
    plan = _trial_plan(groups)
    if not plan.removals:
        return None
    ref, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    try:
        zero_channels(ref, groups, plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_plan(pruned, x, plan, groups=groups)
        with torch.no_grad():
            want, got = ref(x), pruned(x)
    except Exception as e:  # noqa: BLE001 - any failure means the construct is not mapped exactly
        return f"pruning it breaks the forward ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return "pruning it changes the output's shape"
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if err > 1e-4 * (1.0 + float(want.abs().max())):
        return f"pruning it changes the function (|pruned - zeroed| up to {err:.2g}): a construct the engine " \
               "cannot map exactly"
    return None


#: Seconds the exactness trial may bisect for: past them, the groups not yet cleared stay whole with
#: that reason (never a hang on a model with many inexact groups).
TRIAL_BUDGET_S = 60.0


def inexact_groups(model: nn.Module, x: torch.Tensor, groups: Sequence[ChannelGroup],
                   deadline: float | None = None) -> dict[str, str]:
    """Root -> why, for the groups whose pruning is not exact (trialled together, then bisected)."""
    deadline = time.perf_counter() + TRIAL_BUDGET_S if deadline is None else deadline
    if time.perf_counter() > deadline:
        return {g.root: f"not checked: the exactness trial ran past its {TRIAL_BUDGET_S:.0f} s "
                        "(kdprune.engine.groups.TRIAL_BUDGET_S)" for g in groups}
    why = _trial(model, x, groups)
    if why is None:
        return {}
    if len(groups) == 1:
        return {groups[0].root: why}
    half = len(groups) // 2
    found = {**inexact_groups(model, x, groups[:half], deadline), **inexact_groups(model, x, groups[half:], deadline)}
    return found or {g.root: f"{why} (only together with other groups)" for g in groups}


def group_table(model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[nn.Module | str] = (),
                dg: tp.DependencyGraph | None = None, root_types: tuple[type, ...] = _ROOTS) -> list[GroupStatus]:
    """Every channel group (DepGraph, Fang et al. 2023, linked where a shuffle, a channel slice, a
    channel multiplier or a grouped conv couples several), in module order, with why it stays
    whole; on models with constructs outside the known-exact ones, each group is trial-pruned."""
    dg = dg or build_graph(model, example_input)
    table = raw_group_table(model, example_input, ignored_layers, dg, root_types)
    if getattr(model, "kdprune_masks", None) is not None or not _needs_trial(model, dg):
        return table
    open_ = [replace(s.group, index=i) for i, s in enumerate(table) if s.blocker is None]
    bad = inexact_groups(model, example_input, open_)
    return [GroupStatus(s.group, bad.get(s.group.root) if s.blocker is None else s.blocker) for s in table]


def channel_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    ignored_layers: Sequence[nn.Module | str] = (),
    dg: tp.DependencyGraph | None = None,
    root_types: tuple[type, ...] = _ROOTS,
) -> list[ChannelGroup]:
    """Prunable output-channel groups of ``model`` (DepGraph, Fang et al. 2023, linked across
    shuffles, slices, channel multipliers and grouped convs), excluding the classifier output,
    groups touching ``ignored_layers`` or channel barriers, groups whose ties cannot be honoured,
    and groups whose pruning is not exact."""
    found = []
    for status in group_table(model, example_input, ignored_layers, dg, root_types):
        g = status.group
        if status.blocker is None:
            found.append(replace(g, index=len(found)))
        elif not any(m.kind in _UNPRUNABLE for m in g.members) and invalid_member(model, g.members):
            warnings.warn(f"kdprune: the channel group of {g.root!r} is left unpruned: {status.blocker}", stacklevel=2)
    return found
