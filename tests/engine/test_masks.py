"""Soft masks / gates: identity at init, folding, equivalence with physical removal, state_dict."""
from __future__ import annotations

import copy

import pytest
import torch

from kdprune.engine import (
    MaskKind, MaskSet, apply_plan, attach_masks, channel_groups, fold_gates_into_bn, masks_to_plan,
)
from tests.engine.tiny_models import ChainNet, MiniRes, UserNet, randomize

X = torch.randn(4, 3, 16, 16)
MODELS = {"chain": ChainNet, "res_b": lambda: MiniRes("B"), "res_a": lambda: MiniRes("A"), "user": UserNet}


def setup(name: str, kind: str = "gate"):
    m = randomize(MODELS[name](), X)
    groups = channel_groups(m, X[:1])
    return m, groups


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", [MaskKind.MASK, MaskKind.GATE])
def test_init_ones_leave_outputs_unchanged(name, kind):
    m, groups = setup(name)
    ref = m(X)
    masks = attach_masks(m, groups, kind=kind)
    assert m.kdprune_masks is masks
    assert torch.equal(m(X), ref)
    masks.remove()
    assert not hasattr(m, "kdprune_masks") and torch.equal(m(X), ref)
    assert all(not h for mod in m.modules() for h in [mod._forward_hooks])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folded_gates_equal_gated(name):
    m, groups = setup(name)
    masks = attach_masks(m, groups, kind=MaskKind.GATE)
    g = torch.Generator().manual_seed(0)
    for grp in groups:
        v = torch.rand(grp.channels, generator=g) * 1.5
        v[torch.rand(grp.channels, generator=g) < 0.3] = 0
        masks.set_mask(grp, v)
    gated = m(X)
    fold_gates_into_bn(m, masks)
    assert not hasattr(m, "kdprune_masks")
    torch.testing.assert_close(m(X), gated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_masked_equals_physically_pruned(name):
    m, groups = setup(name)
    masks = attach_masks(m, groups, kind=MaskKind.MASK)
    g = torch.Generator().manual_seed(1)
    for grp in groups:
        keep = torch.rand(grp.channels, generator=g) > 0.4
        keep[int(torch.randint(grp.channels, (1,), generator=g))] = True
        masks.set_mask(grp.root, keep)
    masked = m(X)
    plan = masks_to_plan(masks)
    assert plan.num_removed > 0
    masks.remove()
    pruned = copy.deepcopy(m)
    apply_plan(pruned, X[:1], plan)
    torch.testing.assert_close(pruned(X), masked, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in m.parameters())


def test_gates_get_gradients_and_state_dict_round_trip():
    m, groups = setup("res_b")
    masks = attach_masks(m, groups, kind=MaskKind.GATE)
    assert all(isinstance(masks.value(g), torch.nn.Parameter) for g in groups)
    assert {id(p) for p in masks.parameters()} <= {id(p) for p in m.parameters()}  # optimiser sees them
    m.train()
    m(X).square().mean().backward()
    assert all(masks.value(g).grad is not None and masks.value(g).grad.abs().sum() > 0 for g in groups)
    masks.set_mask(groups[1], torch.linspace(0, 1, groups[1].channels))
    sd = m.state_dict()
    key = [k for k in sd if k.startswith("kdprune_masks.")]
    assert len(key) == len(groups)
    fresh = MODELS["res_b"]()
    fresh_masks = attach_masks(fresh, channel_groups(fresh, X[:1]), kind=MaskKind.GATE)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh_masks.value(groups[1]), masks.value(groups[1]))
    m.eval(), fresh.eval()
    assert torch.equal(fresh(X), m(X))


def test_hard_masks_are_buffers_and_deepcopy_keeps_hooks_consistent():
    m, groups = setup("chain")
    masks = attach_masks(m, groups, kind=MaskKind.MASK)
    assert len(list(masks.parameters())) == 0 and len(list(masks.buffers())) == len(groups)
    masks.set_mask("conv2", [True] * 6 + [False] * 6)
    clone = copy.deepcopy(m)
    assert torch.equal(clone(X), m(X))
    clone.kdprune_masks.set_mask("conv2", [True] * 12)  # only the clone changes
    assert not torch.equal(clone(X), m(X))
    clone.kdprune_masks.remove()
    assert all(not mod._forward_hooks for mod in clone.modules())
    assert all(mod._forward_hooks for mod in [m.bn1, m.conv2, m.bn3])  # original untouched


def test_mask_errors():
    m, groups = setup("chain")
    masks = attach_masks(m, groups)
    with pytest.raises(ValueError, match="entries"):
        masks.set_mask("conv1", [True] * 3)
    with pytest.raises(KeyError):
        masks.set_mask("fc", [True])
    masks.set_mask("conv1", [False] * 8)
    with pytest.raises(ValueError, match="keep at least one"):
        masks_to_plan(masks)
    with pytest.raises(RuntimeError, match="already"):
        attach_masks(m, groups)
    with pytest.raises(ValueError, match="kind"):
        MaskSet(groups, kind="soft")


def test_channel_groups_on_masked_model_ignore_gates():
    m, groups = setup("user")
    attach_masks(m, groups, kind=MaskKind.GATE)
    assert [g.root for g in channel_groups(m, X[:1])] == [g.root for g in groups]
