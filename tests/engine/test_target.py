"""prune_to_target: FLOPs/params budgets within 1%, round_to, and clear errors."""
from __future__ import annotations

import copy

import pytest
import torch

from kdprune.engine import (
    L1, L2, Global, Target, Uniform, apply_plan, channel_groups, get_structure, importance_scores,
    plan_pruning, prune_to_target,
)
from kdprune.metrics import complexity
from tests.engine.tiny_models import ChainNet, MiniRes, WideNet

X8 = torch.randn(1, 3, 8, 8)


def kept(model, dense, x, metric):
    return getattr(complexity(model, example_input=x), metric) / getattr(dense, metric)


@pytest.mark.parametrize("target,mode", [
    (Target(flops=0.3), Uniform()),
    (Target(flops=0.7), Global()),
    (Target(params=0.5), Uniform()),
    (Target(params=0.8), Global()),
])
def test_targets_met_within_one_percent(target, mode):
    torch.manual_seed(0)
    m = WideNet()
    dense = complexity(m, example_input=X8)
    report = prune_to_target(m, X8, target, mode=mode)
    real = kept(m, dense, X8, target.metric)
    assert abs(real - target.value) <= 0.01
    assert report.achieved == pytest.approx(real)
    assert report.dense == dense and report.pruned == complexity(m, example_input=X8)
    assert len(get_structure(m)) == len(report.plan)  # one edit per pruned group, in place


def test_zoo_resnet_flops_target():
    models = pytest.importorskip("kdprune.models")
    m = models.create_model("resnet20")
    x = torch.randn(1, 3, 16, 16)
    dense = complexity(m, example_input=x)
    prune_to_target(m, x, Target(flops=0.6), importance=L2())
    assert abs(kept(m, dense, x, "flops") - 0.6) <= 0.01


def test_round_to_reachable_target():
    torch.manual_seed(1)
    m = WideNet()
    groups = channel_groups(m, X8)
    scores = importance_scores(m, groups, L1())
    # a target that round_to=8 widths can reach: the kept FLOPs of some rounded plan, nudged
    probe = copy.deepcopy(m)
    apply_plan(probe, X8, plan_pruning(groups, scores, 0.45, Global(), round_to=8))
    reachable = kept(probe, complexity(m, example_input=X8), X8, "flops") + 0.004
    dense = complexity(m, example_input=X8)
    prune_to_target(m, X8, Target(flops=reachable), mode=Global(), round_to=8)
    assert abs(kept(m, dense, X8, "flops") - reachable) <= 0.01
    for layer in m.features:
        assert layer[0].out_channels % 8 == 0


def test_round_to_unreachable_says_so():
    m = ChainNet()  # conv widths 8/12/16: with round_to=8 only a few width combinations exist
    with pytest.raises(ValueError, match="round_to"):
        prune_to_target(m, X8, Target(flops=0.77), round_to=8)


@pytest.mark.parametrize("kwargs,match", [
    ({"flops": 0}, "flops=0"),
    ({"flops": 1.5}, "1.5"),
    ({"params": -0.2}, "-0.2"),
    ({}, "exactly one"),
    ({"flops": 0.5, "params": 0.5}, "exactly one"),
])
def test_invalid_targets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Target(**kwargs)


def test_unreachable_under_min_width_names_smallest_fraction():
    m = WideNet(width=64, depth=3)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"smallest reachable fraction is 0\.\d+"):
        prune_to_target(m, X8, Target(flops=0.3), min_width=56)
    # nothing was pruned
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_target_respects_ignored_layers_and_scores():
    m = MiniRes("B")
    x = torch.randn(1, 3, 16, 16)
    report = prune_to_target(m, x, Target(params=0.7), mode=Global(), ignored_layers=["layer1.conv1"],
                             scores={"stem.0": torch.arange(8).float()})
    assert m.layer1.conv1.out_channels == 8
    assert "layer1.conv1" not in report.plan
    if "stem.0" in report.plan:  # lowest custom scores go first
        assert report.plan["stem.0"] == tuple(range(len(report.plan["stem.0"])))


@pytest.mark.parametrize("mode", [Uniform(), Global()])
def test_round_to_mixes_rounded_widths_to_land_within_1_percent(mode):
    # ResNet-20 (option B) at 50% of FLOPs with round_to=8: no single allocation ratio lands within
    # 1% (the kept fraction jumps from 0.54 to below 0.49); narrowing single groups by one step of 8
    # from the plan just above the target does.
    models = pytest.importorskip("kdprune.models")
    torch.manual_seed(0)
    m = models.create_model("resnet20", num_classes=10, in_chans=1, shortcut="B")
    x = torch.zeros(1, 1, 28, 28)
    dense = complexity(m, example_input=x)
    widths = {n: c.out_channels for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d)}
    rep = prune_to_target(m, x, Target(flops=0.5), mode=mode, round_to=8)
    assert abs(kept(m, dense, x, "flops") - 0.5) <= 0.01 and abs(rep.achieved - 0.5) <= 0.01
    for n, c in m.named_modules():
        if isinstance(c, torch.nn.Conv2d) and c.out_channels != widths[n]:
            assert c.out_channels % 8 == 0, (n, c.out_channels)


def test_tied_refinement_ranks_classes_by_mean_like_lowest_channels():
    """Uneven tie classes: the budget refinement drops the class with the lowest *mean* score
    (as allocate.lowest_channels ranks them), not the one with the lowest sum."""
    from kdprune.engine import ChannelGroup
    from kdprune.engine.target import _step_down_tied

    g = ChannelGroup(index=0, root="conv", dim="out", channels=6, members=(), sites=(),
                     ties=((0, 1, 2, 3), (4, 5)))
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.5, 1.5])  # sums 4 vs 3, means 1 vs 1.5
    assert _step_down_tied(g, scores, (), min_width=1, round_to=2) == (0, 1, 2, 3)
