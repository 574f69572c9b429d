"""Uniform vs global allocation, min_width and round_to."""
from __future__ import annotations

import pytest
import torch

from kdprune.engine import ChannelGroup, Global, PruningPlan, Uniform, plan_pruning, round_width


def grp(root: str, channels: int, index: int = 0) -> ChannelGroup:
    return ChannelGroup(index=index, root=root, dim="out", channels=channels, members=(), sites=())


A, B = grp("a", 8, 0), grp("b", 16, 1)
SCORES = {"a": torch.arange(8, 0, -1).float(),  # a: channel 7 least important
          "b": torch.arange(16).float() + 1}  # b: channel 0 least important


def test_plan_is_sorted_and_deduplicated():
    p = PruningPlan({"x": [3, 1, 3, 2]})
    assert p["x"] == (1, 2, 3) and p.num_removed == 3 and p.to_dict() == {"x": [1, 2, 3]}
    assert "x" in p and len(p) == 1 and list(p) == ["x"]


def test_uniform_same_fraction_lowest_scores():
    plan = plan_pruning([A, B], SCORES, 0.5, Uniform())
    assert plan["a"] == (4, 5, 6, 7)
    assert plan["b"] == tuple(range(8))
    assert plan_pruning([A, B], SCORES, 0.0).num_removed == 0


def test_uniform_fraction_dithered_within_one_channel():
    groups = [grp(f"g{i}", 16, i) for i in range(4)]
    scores = {g.root: torch.rand(16) for g in groups}
    plan = plan_pruning(groups, scores, 0.53, Uniform())  # 8.48 channels per group
    counts = [len(plan.removals.get(g.root, ())) for g in groups]
    assert set(counts) <= {8, 9} and sum(counts) == round(0.53 * 64)


def test_global_single_threshold_on_normalised_scores():
    # a's scores are tiny after normalisation only for its low half; b is flat -> normalised 1
    scores = {"a": torch.tensor([0.1, 0.1, 0.1, 0.1, 1.9, 1.9, 1.9, 1.9]),
              "b": torch.ones(16)}
    plan = plan_pruning([A, B], scores, 4 / 24, Global())
    assert plan.to_dict() == {"a": [0, 1, 2, 3]}
    # hand threshold: normalised scores (score / group mean), remove the k=12 smallest overall
    plan = plan_pruning([A, B], SCORES, 0.5, Global())
    norm = torch.cat([SCORES["a"] / SCORES["a"].mean(), SCORES["b"] / SCORES["b"].mean()])
    thr = norm.sort().values[11]
    assert len(plan["a"]) == int((norm[:8] <= thr).sum()) and len(plan["b"]) == int((norm[8:] <= thr).sum())
    assert plan.num_removed == 12


@pytest.mark.parametrize("mode", [Uniform(), Global()])
def test_min_width_honoured(mode):
    plan = plan_pruning([A, B], SCORES, 1.0, mode, min_width=3)
    assert len(plan["a"]) == 5 and len(plan["b"]) == 13
    plan = plan_pruning([A, B], SCORES, 1.0, mode, min_width=100)  # more than exists: keep all
    assert plan.num_removed == 0


@pytest.mark.parametrize("mode", [Uniform(), Global()])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 0.9, 1.0])
def test_round_to_honoured(mode, ratio):
    groups = [grp("a", 24, 0), grp("b", 64, 1), grp("c", 6, 2)]
    scores = {g.root: torch.rand(g.channels, generator=torch.Generator().manual_seed(g.index))
              for g in groups}
    plan = plan_pruning(groups, scores, ratio, mode, min_width=4, round_to=8)
    for g in groups:
        keep = g.channels - len(plan.removals.get(g.root, ()))
        assert keep == g.channels or keep % 8 == 0, (g.root, keep)
        assert 4 <= keep <= g.channels
    assert "c" not in plan  # 6 channels: no multiple of 8 in [4, 6] -> left alone


def test_round_width_rules():
    assert round_width(13, 32, 1, 8) == 16 and round_width(11, 32, 1, 8) == 8
    assert round_width(1, 32, 1, 8) == 8  # never below the first multiple >= min_width
    assert round_width(3, 32, 9, 8) == 16  # min_width 9 -> 16
    assert round_width(40, 32, 1, 8) == 32 and round_width(5, 6, 1, 8) == 6
    assert round_width(0, 10, 2, None) == 2 and round_width(7, 10) == 7


def test_plan_validation():
    with pytest.raises(ValueError, match="ratio"):
        plan_pruning([A], SCORES, 1.5)
    with pytest.raises(ValueError, match="mode"):
        plan_pruning([A], SCORES, 0.5, "layerwise")
    with pytest.raises(ValueError, match="no scores"):
        plan_pruning([grp("z", 4)], SCORES, 0.5)
    with pytest.raises(ValueError, match="min_width"):
        plan_pruning([A], SCORES, 0.5, min_width=0)
