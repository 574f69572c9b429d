"""Importance criteria against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from kdprune.engine import (
    IMPORTANCE, L1, L2, BNScale, Random, Taylor, channel_groups, importance_scores, plan_pruning,
)
from tests.engine.tiny_models import ChainNet, MiniRes, UserNet, randomize

X = torch.randn(2, 3, 8, 8)


def by_root(model):
    return {g.root: g for g in channel_groups(model, X[:1])}


def test_registry_names():
    assert {"l1", "l2", "bn_scale", "taylor", "random"} <= set(IMPORTANCE.names())


def test_l1_l2_single_conv_equal_filter_norms():
    m = ChainNet()
    s1 = importance_scores(m, list(by_root(m).values()), L1())
    s2 = importance_scores(m, list(by_root(m).values()), L2())
    w = m.conv1.weight.detach()
    torch.testing.assert_close(s1["conv1"], w.abs().sum((1, 2, 3)))
    torch.testing.assert_close(s2["conv1"], w.pow(2).sum((1, 2, 3)).sqrt())
    torch.testing.assert_close(s1["conv2"], m.conv2.weight.detach().abs().sum((1, 2, 3)))


def test_l1_residual_group_is_mean_over_coupled_convs():
    m = MiniRes("B")
    g = by_root(m)["layer2.0.shortcut.0"]
    convs = [m.layer2[0].shortcut[0], m.layer2[0].conv2, m.layer2[1].conv2]
    expect = torch.stack([c.weight.detach().abs().sum((1, 2, 3)) for c in convs]).mean(0)
    torch.testing.assert_close(importance_scores(m, [g], L1())[g.root], expect)


def test_l1_concat_and_depthwise_mapping():
    m = UserNet()
    g = by_root(m)["dw.0"]
    dw = m.dw[0].weight.detach().abs().sum((1, 2, 3))  # [16]
    branch = torch.cat([m.branch_a[0].weight.detach().abs().sum((1, 2, 3)),
                        m.branch_b[0].weight.detach().abs().sum((1, 2, 3))])  # 6 + 10
    torch.testing.assert_close(importance_scores(m, [g], L1())["dw.0"], (dw + branch) / 2)


def test_bn_scale_is_abs_gamma():
    m = randomize(ChainNet(), X)
    with torch.no_grad():
        m.bn1.weight[2] = -3.0
    groups = list(by_root(m).values())
    s = importance_scores(m, [g for g in groups if g.root == "conv1"], BNScale())
    torch.testing.assert_close(s["conv1"], m.bn1.weight.detach().abs())
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        importance_scores(m, [g for g in groups if g.root == "conv2"], BNScale())  # conv2 has no BN


def test_taylor_matches_autograd_by_hand():
    m = randomize(ChainNet(), X)
    m.train()
    loss = m(X).pow(2).mean()
    gw, gbw, gbb = torch.autograd.grad(loss, [m.conv1.weight, m.bn1.weight, m.bn1.bias])
    conv = (m.conv1.weight * gw).abs().sum((1, 2, 3))
    bn = (m.bn1.weight * gbw).abs() + (m.bn1.bias * gbb).abs()
    expect = ((conv + bn) / 2).detach()
    m.zero_grad()
    m(X).pow(2).mean().backward()
    groups = [by_root(m)["conv1"]]
    torch.testing.assert_close(importance_scores(m, groups, Taylor())["conv1"], expect)


def test_taylor_without_grads_is_clear():
    m = ChainNet()
    with pytest.raises(ValueError, match="backward"):
        importance_scores(m, list(by_root(m).values()), Taylor())


def test_random_is_seeded():
    m = ChainNet()
    groups = list(by_root(m).values())
    a, b = importance_scores(m, groups, Random(), seed=1), importance_scores(m, groups, Random(), seed=1)
    c = importance_scores(m, groups, Random(), seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv3"], c["conv3"])
    assert not torch.equal(a["conv1"], a["conv3"][:8])  # groups get different streams


def test_custom_scores_override_and_validation():
    m = ChainNet()
    groups = list(by_root(m).values())
    custom = torch.arange(12, 0, -1).float()  # channel 11 least important
    s = importance_scores(m, groups, L1(), scores={"conv2": custom})
    assert torch.equal(s["conv2"], custom)
    torch.testing.assert_close(s["conv1"], m.conv1.weight.detach().abs().sum((1, 2, 3)))
    plan = plan_pruning(groups, s, 0.25)
    assert plan["conv2"] == (9, 10, 11)
    with pytest.raises(ValueError, match="unknown group roots"):
        importance_scores(m, groups, L1(), scores={"fc": torch.ones(10)})
    with pytest.raises(ValueError, match="entries"):
        importance_scores(m, groups, L1(), scores={"conv2": torch.ones(3)})
    with pytest.raises(KeyError, match="Did you mean"):
        IMPORTANCE.get("l11")  # names are looked up only at the YAML/CLI boundary
    assert isinstance(IMPORTANCE.get("l1")(), L1)
    with pytest.raises(TypeError, match=r"L1\(\)"):
        importance_scores(m, groups, "l1")


def test_callable_criterion():
    m = ChainNet()
    groups = list(by_root(m).values())
    s = importance_scores(m, groups, lambda model, g, **kw: torch.full((g.channels,), 7.0))
    assert all(torch.all(v == 7) for v in s.values())
