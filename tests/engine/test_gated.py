"""prune_gated: a gated model with some gates at zero equals, after those channels are cut out,
the smaller model gated by the surviving gates (every construct the engine handles)."""
from __future__ import annotations

import copy

import pytest
import torch

from kdprune.engine.fold import fold_weight_transform
from kdprune.engine import GroupsChangedError, MaskKind, attach_masks, channel_groups, prune_gated

from .test_constructs import FACTORIES, X, _model
from .tiny_models import random_plan


def _gated(name: str, seed: int, max_frac: float = 0.5):
    model = _model(name)
    groups = channel_groups(model, X)
    masks = attach_masks(model, groups, kind=MaskKind.GATE)
    plan = random_plan(groups, seed, max_frac)
    g = torch.Generator().manual_seed(seed)
    drop = {}
    for grp in groups:
        d = torch.zeros(grp.channels, dtype=torch.bool)
        d[list(plan.removals.get(grp.root, ()))] = True
        masks.set_mask(grp, (torch.rand(grp.channels, generator=g) + 0.25).masked_fill(d, 0.0))
        drop[grp.root] = d
    return model, masks, drop


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_pruned_gated_equals_gated(name):
    model, masks, drop = _gated(name, seed=1)
    assert sum(int(d.sum()) for d in drop.values()) > 0
    with torch.no_grad():
        ref = model(X)
    before = sum(p.numel() for n, p in model.named_parameters() if "kdprune_masks" not in n)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    folded = copy.deepcopy(model)  # a conv whose forward transforms its weight is cut as the conv it runs
    for m in folded.modules():
        fold_weight_transform(m)
    old_folded = {n: p.detach().clone() for n, p in folded.named_parameters()}
    new, kept = prune_gated(model, masks, drop, X)
    assert model.kdprune_masks is new and masks._model is None
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for n, p in model.named_parameters() if "kdprune_masks" not in n) < before
    for root, d in drop.items():  # the survivors' gates, in order
        assert torch.equal(new.value(root).detach(), masks.value(root).detach()[~d])
        assert new.value(root).requires_grad
    for n, p in model.named_parameters():  # kept names the entries of each old parameter that survived
        sel, sel_folded = old[n], old_folded[n]
        for dim, idx in enumerate(kept[n]):
            sel, sel_folded = sel.index_select(dim, idx), sel_folded.index_select(dim, idx)
        assert torch.equal(sel, p.detach()) or torch.equal(sel_folded, p.detach()), n


def test_a_live_gate_cannot_be_dropped():
    model, masks, drop = _gated("resnext", seed=0)
    root = next(r for r, d in drop.items() if d.any())
    with torch.no_grad():
        masks.value(root)[drop[root].nonzero()[0]] = 0.5
    with pytest.raises(ValueError, match="non-zero gate"):
        prune_gated(model, masks, drop, X)


def test_a_cut_that_changes_the_groups_is_refused_before_any_change():
    """ResNeXt's grouped 3x3 left with one channel per group turns depthwise: its input and
    output groups merge, and two gates per channel cannot become one."""
    model, masks, drop = _gated("resnext", seed=1, max_frac=0.75)
    with torch.no_grad():
        ref = model(X)
    params = [p.clone() for p in model.parameters()]
    with pytest.raises(GroupsChangedError, match="changes the channel groups"):
        prune_gated(model, masks, drop, X)
    assert model.kdprune_masks is masks
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    with torch.no_grad():
        assert torch.equal(model(X), ref)
