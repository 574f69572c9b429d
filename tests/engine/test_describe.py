"""describe(): the coverage report agrees with channel_groups and names why a layer stays whole."""
import pytest
import torch

from kdprune.engine import channel_groups, describe

from .tiny_models import ChainNet, DualPath, GroupedNet, MiniRes, MultiplierNet, UserNet, randomize

X = torch.randn(2, 3, 16, 16)


def _by_name(rows):
    return {r.name: r for r in rows}


@pytest.mark.parametrize("make", [ChainNet, MiniRes, UserNet, GroupedNet, DualPath])
def test_prunable_layers_are_exactly_the_out_members_of_channel_groups(make):
    torch.manual_seed(0)
    model = randomize(make(), X)
    rows = describe(model, X[:1])
    groups = channel_groups(model, X[:1])
    out_members = {m.name: g.root for g in groups for m in g.members if m.role == "out" and m.kind != "bn"}
    prunable = {r.name: r.group for r in rows if r.prunable}
    assert prunable == {k: v for k, v in out_members.items() if k in prunable}
    assert set(prunable) == {k for k in out_members if k in _by_name(rows)}


def test_reasons_name_the_cause_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = randomize(MultiplierNet(), X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _by_name(describe(model, X[:1]))
    assert rows["fc"].reason == "classifier output" and not rows["fc"].prunable
    # the multiplier conv drops whole conv groups: its inputs and outputs are one linked group
    assert rows["a.0"].prunable and rows["a.0"].reason == "group root"
    assert rows["g.0"].prunable and rows["g.0"].reason == "in the group of a.0"
    assert rows["b.0"].prunable and rows["b.0"].reason == "group root"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    chain = _by_name(describe(ChainNet(), X[:1], ignored_layers=["conv2"]))
    assert chain["conv2"].reason == "ignored by the caller" and chain["conv1"].prunable


def test_channel_slices_are_pruned_through():
    torch.manual_seed(0)
    rows = _by_name(describe(DualPath(), X[:1]))
    for name in ("a", "b", "stem.0", "head.0"):  # sliced, added and concatenated: the engine links the slices
        assert rows[name].prunable, rows[name].reason
