"""Physical removal inside a gated run: channels whose gates are held at zero are cut out of the
live model while the surviving channels keep their gates (values and all), so that the rest of
the run trains a smaller network that computes exactly what the gated one did."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.graph import ChannelGroup
from kdprune.engine.links import channel_groups
from kdprune.engine.masks import MaskKind, MaskSet, attach_masks
from kdprune.engine.prune import apply_plan

__all__ = ["GroupsChangedError", "prune_gated"]


class GroupsChangedError(ValueError):
    """Cutting the channels would change the model's channel groups (e.g. a grouped conv left
    with one channel per group turns depthwise and ties its input and output groups): one gate
    per surviving channel could not reproduce the gated model. The model is left untouched."""


def _pruned_groups(model: nn.Module, plan: PruningPlan, x: torch.Tensor) -> list[ChannelGroup]:
    """The channel groups ``model`` will have once ``plan`` is cut (traced on a copy)."""
    trial = copy.deepcopy(model)
    trial.kdprune_masks.remove()
    apply_plan(trial, x, plan)
    return channel_groups(trial, x)


@torch.no_grad()
def prune_gated(model: nn.Module, masks: MaskSet, drop: Mapping[str, torch.Tensor],
                example_input: torch.Tensor) -> MaskSet:
    """Remove the channels ``drop`` marks (a bool vector per gated group, in the group's channel
    order; their gates must be 0) and gate the survivors with their current values; returns the
    new, attached ``MaskSet`` (``masks`` is detached). Raises ``GroupsChangedError``, before any
    change, when the cut would merge or split channel groups."""
    if masks.kind is not MaskKind.GATE:
        raise ValueError("prune_gated needs gates (MaskKind.GATE); masks have no values to carry over")
    for root, d in drop.items():
        if d.any() and bool(masks.value(root).detach()[d.to(masks.value(root).device)].ne(0).any()):
            raise ValueError(f"group {root!r}: a channel to drop has a non-zero gate; removing it would "
                             "change the model's output")
    survivors = {r: masks.value(r).detach()[~drop[r].to(masks.value(r).device)].clone() if r in drop
                 else masks.value(r).detach().clone() for r in masks.groups}
    x = example_input.to(next(model.parameters()).device)
    plan = PruningPlan({r: d.nonzero().flatten().tolist() for r, d in drop.items() if d.any()})
    groups = _pruned_groups(model, plan, x)
    sizes, expected = {g.root: g.channels for g in groups}, {r: len(v) for r, v in survivors.items()}
    if sizes != expected:
        raise GroupsChangedError(f"cutting these channels changes the channel groups ({sizes} vs the surviving "
                                 f"gates' {expected}); keep them gated")
    masks.remove()
    apply_plan(model, x, plan)
    new = attach_masks(model, groups, kind=MaskKind.GATE)  # the copy's groups: same names, same shapes
    for root, v in survivors.items():
        new.value(root).copy_(v)
    return new
