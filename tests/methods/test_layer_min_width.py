"""layer_min_width on every channel-pruning recipe: a named (or globbed) layer keeps at least its floor,
the rest of the network carries the cut; the engine's MinWidth floors only the groups a layer outputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import kdprune as kp
from kdprune.cli.compress_cmd import build_recipe
from kdprune.cli.main import build_parser
from kdprune.engine import MinWidth, channel_groups, floor_of, plan_pruning

from ..conftest import TinyNet
from .tiny_recipes import CHANNEL_RECIPES, FT

FLOOR = 30  # of 32: far above the ~25 channels a uniform 60% FLOPs cut leaves features.0
# the torch-pruning peers refuse a floor (tested below)
RECIPES = [r for r in CHANNEL_RECIPES if not isinstance(r, kp.recipes.TPMagnitude)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: type(r).__name__)
def test_a_floored_layer_keeps_its_floor(recipe, toy_data):
    train, val = toy_data
    torch.manual_seed(0)
    res = kp.compress(TinyNet(width=32), dataclasses.replace(recipe, layer_min_width=(("features.0", FLOOR),)),
                      train, val, latency=False)
    widths = res.report["widths"]["after"]
    assert FLOOR <= widths["features.0"] and widths["features.3"] < 32  # the other conv carries the cut


def test_without_the_floor_the_same_cut_narrows_that_layer(toy_data):
    # the twin of the test above: the floor, not the target, is what keeps features.0 wide
    train, val = toy_data
    torch.manual_seed(0)
    res = kp.compress(TinyNet(width=32), RECIPES[0], train, val, latency=False)
    assert res.report["widths"]["after"]["features.0"] < FLOOR


class _Two(nn.Module):
    """stem -> body: the body conv consumes the stem's channels (an "in" member of the stem group)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_min_width_floors_the_groups_a_layer_outputs_and_takes_the_largest_match():
    model, x = _Two(), torch.randn(1, 1, 8, 8)
    stem, body = channel_groups(model, x)
    floors = MinWidth(2, (("stem.*", 5), ("stem.0", 6), ("body.0", 3)))
    # body.0 consumes the stem's channels, but its floor is for its own output width
    assert (floors.of(stem), floors.of(body)) == (6, 3)
    assert floor_of(4, stem) == 4
    scores = {g.root: torch.arange(g.channels, dtype=torch.float) for g in (stem, body)}
    plan = plan_pruning([stem, body], scores, 1.0, min_width=floors)  # remove all that is allowed
    assert (8 - len(plan.removals[stem.root]), 12 - len(plan.removals[body.root])) == (6, 3)


def test_bad_floors_are_clear_errors(toy_data):
    train, val = toy_data
    with pytest.raises(ValueError, match="must be an int >= 1"):
        kp.recipes.L1Finetune(target_flops=0.6, layer_min_width=(("features.0", 0),))
    with pytest.raises(ValueError, match="layer_min_width: 'stem.*' names no layer of TinyNet"):
        kp.compress(TinyNet(width=32), kp.recipes.L1Finetune(target_flops=0.6, finetune=FT,
                                                             layer_min_width=(("stem.*", 4),)),
                    train, val, latency=False)
    with pytest.raises(ValueError, match="torch-pruning has no minimum width"):
        kp.compress(TinyNet(width=32), kp.recipes.TPMagnitude(target_flops=0.6, finetune=FT,
                                                              layer_min_width=(("features.0", 4),)),
                    train, val, latency=False)


def test_the_flag_takes_name_equals_count():
    args = build_parser().parse_args(["compress", "--from", "x", "--out", "y", "--method", "sdap", "--target-flops",
                                      "0.5", "--layer-min-width", "features.0=8", "layer*.conv1=4"])
    assert build_recipe(args).layer_min_width == (("features.0", 8), ("layer*.conv1", 4))
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["compress", "--from", "x", "--out", "y", "--layer-min-width", "features.0"])
    assert e.value.code == 2
