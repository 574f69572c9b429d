"""Physical removal inside a gated run: channels whose gates are held at zero are cut out of the
live model while the surviving channels keep their gates (values and all), so that the rest of
the run trains a smaller network that computes exactly what the gated one did. The cut also says
which entries of every parameter survived, so per-parameter state (momentum, Adam moments) can
follow them."""
from __future__ import annotations

import copy
from typing import Mapping, NamedTuple

import torch
from torch import nn

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.fold import fold_weight_transform
from kdprune.engine.graph import ChannelGroup
from kdprune.engine.groups import channel_groups
from kdprune.engine.masks import MaskKind, MaskSet, attach_masks
from kdprune.engine.prune import apply_plan

__all__ = ["GatedCut", "GroupsChangedError", "prune_gated"]

Kept = dict[str, tuple[torch.Tensor, ...]]  # parameter name -> surviving indices of dim 0 (and dim 1)


class GatedCut(NamedTuple):
    """What ``prune_gated`` did: the new gates, and per parameter (by name, gates included) the
    indices of dims 0 and 1 that survived (a parameter the cut left whole maps to all of them)."""

    masks: MaskSet
    kept: Kept


class GroupsChangedError(ValueError):
    """Cutting the channels would change the model's channel groups (e.g. a grouped conv left
    with one channel per group turns depthwise and ties its input and output groups): one gate
    per surviving channel could not reproduce the gated model. The model is left untouched."""


@torch.no_grad()
def _encode_positions(model: nn.Module) -> dict[str, int]:
    """Fill every parameter with its own position, i0 * size(1) + i1 (float64: exact to 2^53), so
    that after a cut, which only selects entries, the values say which survived; returns size(1)."""
    cols = {}
    for name, p in model.named_parameters():
        if p.dim() == 0:
            continue
        cols[name] = p.shape[1] if p.dim() > 1 else 1
        pos = torch.arange(p.shape[0] * cols[name], dtype=torch.float64, device=p.device)
        pos = pos.view(p.shape[0], *([cols[name]] if p.dim() > 1 else []), *[1] * (p.dim() - 2))
        p.copy_(pos.expand_as(p))
    return cols


def _decode_positions(model: nn.Module, cols: Mapping[str, int]) -> Kept:
    """The surviving dim-0 (and dim-1) indices of every parameter ``_encode_positions`` filled."""
    kept: Kept = {}
    for name, p in model.named_parameters():
        if name not in cols:
            continue
        v = p.detach().reshape(p.shape[0], p.shape[1] if p.dim() > 1 else 1, -1)[:, :, 0]
        i0, i1 = (v[:, 0] // cols[name]).long(), (v[0, :] % cols[name]).long()
        if not torch.equal(v, (i0[:, None] * cols[name] + i1[None, :]).to(v)):
            continue  # not a plain selection (cannot happen with apply_plan): no state follows it
        kept[name] = (i0.cpu(),) if p.dim() == 1 else (i0.cpu(), i1.cpu())
    return kept


def _pruned_groups(model: nn.Module, plan: PruningPlan, x: torch.Tensor) -> tuple[list[ChannelGroup], Kept]:
    """The channel groups ``model`` will have once ``plan`` is cut, and which entries of each
    parameter survive (traced on a float64 copy whose values are their own positions)."""
    trial = copy.deepcopy(model)
    trial.kdprune_masks.remove()
    trial.double()
    for m in trial.modules():  # fold first (as apply_plan will): positions must survive as positions
        fold_weight_transform(m)
    cols = _encode_positions(trial)
    apply_plan(trial, x.double(), plan)
    return channel_groups(trial, x.double()), _decode_positions(trial, cols)


@torch.no_grad()
def prune_gated(model: nn.Module, masks: MaskSet, drop: Mapping[str, torch.Tensor],
                example_input: torch.Tensor) -> GatedCut:
    """Remove the channels ``drop`` marks (a bool vector per gated group, in the group's channel
    order; their gates must be 0) and gate the survivors with their current values; returns the
    new, attached ``MaskSet`` (``masks`` is detached) and the surviving indices of every
    parameter. Raises ``GroupsChangedError``, before any change, when the cut would merge or
    split channel groups."""
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
    groups, kept = _pruned_groups(model, plan, x)
    sizes, expected = {g.root: g.channels for g in groups}, {r: len(v) for r, v in survivors.items()}
    if sizes != expected:
        raise GroupsChangedError(f"cutting these channels changes the channel groups ({sizes} vs the surviving "
                                 f"gates' {expected}); keep them gated")
    masks.remove()
    apply_plan(model, x, plan)
    new = attach_masks(model, groups, kind=MaskKind.GATE)  # the copy's groups: same names, same shapes
    for root, v in survivors.items():
        new.value(root).copy_(v)
        d = drop.get(root, torch.zeros(len(v), dtype=torch.bool))
        kept[new.parameter_name(root)] = ((~d.cpu()).nonzero().flatten(),)
    return GatedCut(new, kept)
