"""Channel groups: coupling, classifier/input protection, option-A barriers, ignored layers."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.engine import (
    BARRIER_ATTR, ChannelGroup, apply_plan, build_graph, channel_groups, find_barriers, tp_group,
)
from kdprune.engine.allocate import PruningPlan
from tests.engine.tiny_models import ChainNet, GroupedNet, MiniRes, UserNet, randomize, zero_removed

X = torch.randn(1, 3, 16, 16)


def names(groups):
    return [g.root for g in groups]


def test_chain_groups_members_and_sites():
    m = ChainNet()
    groups = channel_groups(m, X)
    assert names(groups) == ["conv1", "conv2", "conv3"]  # fc (classifier) never a root
    assert [g.channels for g in groups] == [8, 12, 16]
    assert [g.index for g in groups] == [0, 1, 2]
    g1 = groups[0]
    assert g1.dim == "out"
    assert {(mm.name, mm.kind, mm.role) for mm in g1.members} >= {
        ("conv1", "conv", "out"), ("bn1", "bn", "out"), ("conv2", "conv", "in")}
    # the channel is finally formed after the BN, or at the conv itself when no BN follows
    assert [g.sites for g in groups] == [("bn1",), ("conv2",), ("bn3",)]
    assert g1.member("conv2").idxs == tuple(range(8)) == g1.member("conv2").root_idxs
    with pytest.raises(dataclasses.FrozenInstanceError):
        g1.channels = 3  # type: ignore[misc]


def test_tp_group_round_trip():
    m = ChainNet()
    dg = build_graph(m, X)
    groups = channel_groups(m, X, dg=dg)
    tg = tp_group(dg, m, groups[1])
    assert tg[0].dep.target.module is m.conv2 and len(tg[0].idxs) == 12
    assert len(tp_group(dg, m, "conv2", [0, 1])[0].idxs) == 2


def test_input_and_classifier_channels_never_pruned():
    m = randomize(ChainNet(), X)
    groups = channel_groups(m, X)
    plan = PruningPlan({g.root: list(range(g.channels - 1)) for g in groups})  # prune to width 1
    apply_plan(m, X, plan)
    assert m.conv1.in_channels == 3 and m.conv1.weight.shape[1] == 3
    assert m.fc.out_features == 10 and m(X).shape == (1, 10)
    assert (m.conv1.out_channels, m.conv2.out_channels, m.conv3.out_channels) == (1, 1, 1)


class FullyConv(nn.Module):
    """No Linear at all: the last conv produces the output and must be protected."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x))).mean((2, 3))


class NoNameHead(nn.Module):
    """Two linears, no classifier_name: the last nn.Linear is the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.l1, self.l2 = nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.l2(F.relu(self.l1(self.conv(x).mean((2, 3)))))


def test_output_layers_detected_without_classifier_name():
    assert names(channel_groups(FullyConv(), X)) == ["a"]
    assert names(channel_groups(NoNameHead(), X)) == ["conv", "l1"]


def test_option_a_residual_channels_excluded_internal_pruned():
    m = MiniRes("A")
    assert find_barriers(m, X) == ["layer2.0.shortcut"]
    groups = channel_groups(m, X)
    # only block-internal conv1 channels: stem/residual streams touch the pad shortcut
    assert names(groups) == ["layer1.conv1", "layer2.0.conv1", "layer2.1.conv1"]
    for g in groups:
        assert all(mm.kind != "barrier" for mm in g.members)
    b = MiniRes("B")
    assert "stem.0" in names(channel_groups(b, X))  # option B residual stream is prunable


def test_option_a_pruning_equivalent():
    m = randomize(MiniRes("A"), X)
    groups = channel_groups(m, X)
    plan = PruningPlan({g.root: list(range(0, g.channels, 2)) for g in groups})
    ref = zero_removed(m, groups, plan)
    apply_plan(m, X, plan)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=0)
    assert m.layer2[0].conv1.out_channels == 8 and m.layer2[0].conv2.out_channels == 16


def test_option_a_zoo_resnet_groups():
    models = pytest.importorskip("kdprune.models")
    m = models.create_model("resnet20", shortcut="A")
    groups = {g.root: g for g in channel_groups(m, X)}
    inner = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert sorted(groups) == sorted(inner + ["conv1", "layer2.0.conv2", "layer3.0.conv2"])
    assert find_barriers(m, X) == ["layer2.0.shortcut", "layer3.0.shortcut"]
    # The zero-pad shortcuts are channel placers: each stream is its own group, the shortcut's
    # input in the stream before it and its output (a mask site) in the stream after it.
    kinds = {(mm.name, mm.role): mm.kind for mm in groups["layer2.0.conv2"].members}
    assert kinds[("layer2.0.shortcut", "out")] == "place"
    assert "layer2.0.shortcut" in groups["layer2.0.conv2"].sites
    assert any(mm.name == "layer2.0.shortcut" and mm.role == "in" for mm in groups["conv1"].members)


class Tagged(nn.Module):
    """Channel-preserving but declared a barrier through the documented hook attribute."""

    kdprune_channel_barrier = True

    def forward(self, x):
        return x * 1.0


class HookNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.t, self.b, self.c = nn.Conv2d(3, 4, 3), Tagged(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c(self.b(self.t(self.a(x)))).mean((2, 3)))


def test_barrier_hook_attribute():
    assert BARRIER_ATTR == "kdprune_channel_barrier"
    m = HookNet()
    assert find_barriers(m, X) == ["t"]
    assert names(channel_groups(m, X)) == ["b", "c"]  # a's channels flow into the barrier


def test_grouped_conv_groups_are_tied_and_depthwise_kept():
    groups = {g.root: g for g in channel_groups(GroupedNet(), X)}
    assert sorted(groups) == ["a.0", "b.0", "g.0"]
    # groups=2 over 8 channels: channel i goes with i + 4 (same position in both conv groups)
    assert groups["a.0"].ties == ((0, 4), (1, 5), (2, 6), (3, 7)) == groups["g.0"].ties
    assert groups["b.0"].ties == () and groups["b.0"].tie_size == 1
    groups = {g.root: g for g in channel_groups(UserNet(), X)}
    dw = groups["dw.0"]  # depthwise conv couples both concat branches into one group
    kinds = {mm.name: mm.kind for mm in dw.members}
    assert kinds["dw.0"] == "dwconv" and kinds["branch_a.0"] == "conv"
    assert dw.member("branch_b.0").root_idxs == tuple(range(6, 16))
    assert dw.member("branch_b.0").idxs == tuple(range(10))
    assert any(mm.kind == "cat" for mm in dw.members)
    assert any(mm.kind == "add" for mm in groups["stem.0"].members)


def test_ignored_layers_by_name_and_module():
    m = ChainNet()
    assert names(channel_groups(m, X, ignored_layers=["conv2"])) == ["conv1", "conv3"]
    assert names(channel_groups(m, X, ignored_layers=[m.conv3])) == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="nope"):
        channel_groups(m, X, ignored_layers=["nope"])


def test_build_graph_keeps_training_mode():
    m = ChainNet().train()
    build_graph(m, X)
    assert m.training
    assert isinstance(channel_groups(m.eval(), X)[0], ChannelGroup) and not m.training


def test_invalid_member_names_the_layer_whose_width_an_index_exceeds():
    from kdprune.engine.graph import Member, invalid_member

    m = ChainNet()  # conv1: 3 -> 8, bn1: 8
    ok = (Member("conv1", "conv", "out", tuple(range(8)), tuple(range(8))),
          Member("bn1", "bn", "out", tuple(range(8)), tuple(range(8))))
    assert invalid_member(m, ok) is None
    bad = ok + (Member("conv2", "conv", "in", (0, 9), (0, 9)),)  # conv2 has 8 inputs
    assert invalid_member(m, bad) == "conv2 (input index 9 >= its 8 channels)"
