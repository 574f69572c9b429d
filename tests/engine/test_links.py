"""Linked channel groups (engine/links.py): a channel shuffle, a channel multiplier and a grouped
conv over several DepGraph groups each make one group; pruned equals masked, ties are honoured,
and the shuffle is recognised only where it really is one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.engine import PruningPlan, apply_plan, channel_groups, describe
from kdprune.engine.allocate import lowest_channels
from kdprune.engine.graph import ChannelGroup, Member
from kdprune.engine.prune import prune_channels_edit
from kdprune.engine.reshape import find_channel_reshapes, find_channel_shuffles

from .tiny_models import MultiplierNet, random_plan, randomize, zero_removed

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def cbr(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


class ShuffleNet(nn.Module):
    """conv -> inline channel shuffle (g groups) -> conv -> head; ``between`` runs between the view
    and the reshape (data movement or not)."""

    def __init__(self, g: int = 2, between=lambda t: t.transpose(1, 2)) -> None:
        super().__init__()
        self.g, self.between = g, between
        self.a, self.b = cbr(3, 12), cbr(12, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n, c, h, w = y.shape
        y = self.between(y.view(n, self.g, c // self.g, h, w)).reshape(n, c, h, w)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(y), 1), 1))


def _model(make) -> nn.Module:
    torch.manual_seed(0)
    return randomize(make().eval(), X)


@pytest.mark.parametrize("g", [2, 3, 4])
def test_a_shuffle_is_found_with_its_permutation(g):
    model = ShuffleNet(g).eval()
    calls = find_channel_reshapes(model, X)
    (s,) = find_channel_shuffles(model, X, calls)
    per = 12 // g
    assert s.groups == g and s.perm == tuple((j % g) * per + j // g for j in range(12))


@pytest.mark.parametrize("between", [lambda t: t * 2, lambda t: t, lambda t: t.flip(1)],
                         ids=["arithmetic", "identity", "reversed-blocks"])
def test_what_is_not_a_shuffle_stays_a_barrier(between):
    model = _model(lambda: ShuffleNet(3, between))
    assert find_channel_shuffles(model, X, find_channel_reshapes(model, X)) == []
    rows = {r.name: r for r in describe(model, X)}
    assert not rows["a.0"].prunable and "channel reshape" in rows["a.0"].reason


def test_a_shuffle_links_both_sides_into_one_group_with_block_ties():
    model = _model(lambda: ShuffleNet(3))
    (grp,) = [g for g in channel_groups(model, X) if g.root == "a.0"]
    assert [p.root for p in grp.parts] == ["a.0", "@reshape:1"] and grp.channels == 12  # b reads the shuffle
    assert {m.name for m in grp.members if m.role == "in"} >= {"b.0"}  # the conv after the shuffle
    assert sorted(grp.ties) == [(p, 4 + p, 8 + p) for p in range(4)]  # the same position of every block


@pytest.mark.parametrize("make", [lambda: ShuffleNet(2), lambda: ShuffleNet(3), MultiplierNet],
                         ids=["g2", "g3", "mult"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_equals_masked(make, seed):
    model = _model(make)
    groups = channel_groups(model, X)
    plan = random_plan(groups, seed)
    ref = zero_removed(model, groups, plan)
    apply_plan(model, X, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: ShuffleNet(3), MultiplierNet], ids=["g3", "mult"])
def test_given_groups_spare_the_second_trace_and_cut_the_same(make, monkeypatch):
    """apply_plan(groups=...) (what budget searches pass for every candidate copy) expands linked
    groups from them without tracing again, and gives the same network and structure log."""
    import copy

    from kdprune.engine import prune

    model = _model(make)
    groups = channel_groups(model, X)
    plan = random_plan(groups, 0)
    ref, given = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(ref, X, plan)
    monkeypatch.setattr(prune, "raw_group_table", lambda *a, **k: pytest.fail("traced channel groups again"))
    apply_plan(given, X, plan, groups)
    assert ref.kdprune_structure.edits == given.kdprune_structure.edits
    a, b = ref.state_dict(), given.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_multiplier_drops_whole_conv_groups():
    model = _model(MultiplierNet)
    (grp,) = [g for g in channel_groups(model, X) if g.root == "a.0"]
    assert [p.root for p in grp.parts] == ["a.0", "g.0"]
    assert grp.parts[1].map == tuple(l // 2 for l in range(16))  # each input channel owns 2 outputs
    apply_plan(model, X, PruningPlan({"a.0": [1, 4, 6]}))
    conv = model.g[0]
    assert (conv.in_channels, conv.groups, conv.out_channels) == (5, 5, 10)
    assert model.b[0].in_channels == 10 and model.g[1].num_features == 10
    edit = model.kdprune_structure.edits[-1]
    assert edit["linked"] == [{"root": "g.0", "idxs": [2, 3, 8, 9, 12, 13]}]


def test_a_plan_splitting_a_linked_tie_class_is_refused():
    model = _model(lambda: ShuffleNet(2))
    (grp,) = [g for g in channel_groups(model, X) if g.root == "a.0"]
    with pytest.raises(ValueError, match="tie class"):
        prune_channels_edit(grp.root, [grp.ties[0][0]], grp)


def test_uneven_tie_classes_remove_exactly_n_when_sizes_allow():
    members = (Member("c", "conv", "out", tuple(range(6)), tuple(range(6))),)
    grp = ChannelGroup(0, "c", "out", 6, members, ("c",), ties=((0, 1, 2, 3), (4,), (5,)))
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    assert lowest_channels(grp, scores, 4) == (0, 1, 2, 3)
    assert lowest_channels(grp, scores, 2) == (4, 5)  # the 4-class does not fit: the next ones do
    assert grp.tie_size == 1


def _refuses_whole_numbers(t: torch.Tensor) -> torch.Tensor:
    """Data movement that raises on whole-number activations (the probe's channel indices), like an
    op that cannot take them."""
    if torch.all(t == t.round()):
        raise RuntimeError("whole-number activations")
    return t.transpose(1, 2)


def test_a_probe_that_breaks_the_forward_leaves_a_barrier():
    model = _model(lambda: ShuffleNet(3, _refuses_whole_numbers))
    assert find_channel_shuffles(model, X, find_channel_reshapes(model, X)) == []
    rows = {r.name: r for r in describe(model, X)}
    assert not rows["a.0"].prunable and "channel reshape" in rows["a.0"].reason
