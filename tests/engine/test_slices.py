"""Channel slices owned by the engine (engine/slices.py) and the exactness trial (engine/groups.py):
the pieces every slicing call returns, which attributes hold their bounds, the stand-in rewriting
them as channels go, and a slice whose bounds cannot follow (literals) becoming a named barrier."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.engine import PruningPlan, apply_plan, channel_groups, describe
from kdprune.engine.slices import ChannelSlice, channel_pieces, slice_call

from .tiny_models import cbr, randomize, random_plan, zero_removed

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.arange(2 * 10 * 3 * 3, dtype=torch.float32).view(2, 10, 3, 3)


@pytest.mark.parametrize("func, args, kwargs, want", [
    (torch.Tensor.split, (T, [3, 7], 1), {}, ((0, 3), (3, 10))),
    (torch.split, (T, 4), {"dim": 1}, ((0, 4), (4, 8), (8, 10))),
    (torch.Tensor.chunk, (T, 2, 1), {}, ((0, 5), (5, 10))),
    (torch.Tensor.narrow, (T, 1, 2, 5), {}, ((2, 7),)),
    (torch.Tensor.tensor_split, (T, [2, 6], 1), {}, ((0, 2), (2, 6), (6, 10))),
    (torch.Tensor.__getitem__, (T, (slice(None), slice(3, None))), {}, ((3, 10),)),
    (torch.Tensor.__getitem__, (T, (slice(None), slice(None), slice(1, 2))), {}, None),  # spatial
    (torch.Tensor.split, (T, 2, 2), {}, None),  # another dim
    (torch.Tensor.__getitem__, (T, (slice(None), 3)), {}, None),  # an index, not a slice
])
def test_the_pieces_of_every_slicing_call(func, args, kwargs, want):
    assert channel_pieces(func, args, kwargs, func(*args, **kwargs)) == want


class Owner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sizes, self.half, self.oup, self.other = [3, 7], 5, 9, 9  # oup and other tie: no source


def test_bounds_are_traced_to_the_owners_attributes():
    owner = Owner()
    call = slice_call(torch.Tensor.split, (T, owner.sizes, 1), {}, torch.split(T, owner.sizes, 1), "m", owner)
    assert call.sources == (("sizes", "sizes"),) and not call.equal
    call = slice_call(torch.Tensor.split, (T, owner.half, 1), {}, torch.split(T, owner.half, 1), "m", owner)
    assert call.sources == (("size", "half"),) and call.equal  # equal parts: they lose the same positions
    idx = (slice(None), slice(None, owner.oup))
    call = slice_call(torch.Tensor.__getitem__, (T, idx), {}, T[idx], "m", owner)
    assert call.sources == ()  # two attributes hold 9: neither is trusted (the trial decides)
    call = slice_call(torch.Tensor.chunk, (T, 2, 1), {}, T.chunk(2, 1), "m", owner)
    assert call.sources == () and call.equal


def test_removing_input_channels_rewrites_the_bounds():
    owner = Owner()
    call = slice_call(torch.Tensor.split, (T, owner.sizes, 1), {}, torch.split(T, owner.sizes, 1), "m", owner)
    first, second = ChannelSlice(call, 0, owner), ChannelSlice(call, 1, owner)
    for piece in (first, second):
        piece.kdprune_prune_inputs([1, 4, 5])  # one channel of the first part, two of the second
    assert first.bounds == (0, 2) and second.bounds == (2, 7) and owner.sizes == [2, 5]
    first.kdprune_prune_inputs([0])  # the renumbered channels: dense channel 0
    assert first.kept[:2] == [2, 3] and owner.sizes == [1, 5]


class Literal(nn.Module):
    """A slice whose bound is a literal: it cannot follow a pruned width."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.a, self.b = cbr(3, 16), cbr(16, 16), cbr(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.b(self.a(self.stem(x))[:, :8]), 1).flatten(1))


def test_a_slice_that_cannot_follow_is_a_named_barrier_not_a_crash():
    torch.manual_seed(0)
    model = randomize(Literal().eval(), X)
    rows = {r.name: r for r in describe(model, X)}
    assert not rows["a.0"].prunable and "pruning it" in rows["a.0"].reason, rows["a.0"].reason
    assert rows["stem.0"].prunable and rows["b.0"].prunable
    groups = channel_groups(model, X)
    plan = random_plan(groups, 0)
    ref = zero_removed(model, groups, plan)
    apply_plan(model, X, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-5)


class Ghost(nn.Module):
    """cat then ``[:, :self.oup]``: the dropped tail is dead, the kept part follows ``oup``."""

    def __init__(self) -> None:
        super().__init__()
        self.oup = 11
        self.p, self.c = cbr(3, 6), cbr(6, 6, groups=6)
        self.fc = nn.Linear(11, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.p(x)
        return self.fc(torch.cat([y, self.c(y)], 1)[:, :self.oup].mean((2, 3)))


def test_a_sliced_owner_attribute_follows_the_cut_and_is_replayed_on_load(tmp_path):
    from kdprune.io import load_pruned, save_pruned

    torch.manual_seed(0)
    model = randomize(Ghost().eval(), X)
    (g,) = channel_groups(model, X)
    ref = zero_removed(model, [g], PruningPlan({g.root: [0, 5]}))
    apply_plan(model, X, PruningPlan({g.root: [0, 5]}))  # cat channels 0, 5, 6 and the dead 11 go
    assert model.oup == model.fc.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-5)
    save_pruned(model, tmp_path / "m", factory=Ghost)
    loaded = load_pruned(tmp_path / "m", factory=Ghost).eval()
    assert loaded.oup == model.oup and torch.equal(loaded(X), model(X))


def test_the_exactness_trial_stops_at_its_time_budget_naming_it(monkeypatch):
    import kdprune.engine.groups as groups_mod

    torch.manual_seed(0)
    model = randomize(Literal().eval(), X)
    monkeypatch.setattr(groups_mod, "TRIAL_BUDGET_S", -1.0)  # already past: nothing is cleared
    rows = {r.name: r for r in describe(model, X)}
    assert not rows["stem.0"].prunable and "ran past its" in rows["stem.0"].reason


def test_a_bound_derived_from_an_attribute_is_traced_and_rewritten_through_its_ratio():
    """``split(self.expand_chs // 2)`` (no attribute holds the size itself): doubling expand_chs doubles
    the size, so the size is expand_chs * 1/2 and expand_chs follows the pruned width (was: a barrier)."""
    from kdprune.engine import Target, prune_to_target
    from kdprune.engine.reshape import trace_channel_ops
    from kdprune.engine.slices import derive_sources

    from .constructs_split import DerivedCSPNet

    torch.manual_seed(0)
    model = randomize(DerivedCSPNet().eval(), X)
    _, sliced = trace_channel_ops(model, X)
    calls = [c for c, _ in derive_sources(model, X, sliced)]
    assert all(c.sources == (("size", "expand_chs", 1, 2),) for c in calls) and len(calls) == 2
    assert [s.expand_chs for s in (model.stages[0], model.stages[2])] == [32, 64]  # probes restored them
    prune_to_target(model, X, Target(flops=0.5))
    for stage in (model.stages[0], model.stages[2]):
        assert stage.expand_chs == stage.expand[0].out_channels == 2 * stage.blocks[0][0].in_channels
