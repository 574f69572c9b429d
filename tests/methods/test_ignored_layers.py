"""ignored_layers on every channel-pruning recipe: the named (or globbed) layers keep their width."""
from __future__ import annotations

import pytest
import torch

import kdprune as kp
from kdprune.cli.compress_cmd import build_recipe
from kdprune.cli.main import build_parser

from ..conftest import TinyNet
from .tiny_recipes import CHANNEL_RECIPES, FT


@pytest.mark.parametrize("recipe", CHANNEL_RECIPES, ids=lambda r: type(r).__name__)
def test_an_ignored_layer_keeps_its_width(recipe, toy_data):
    import dataclasses

    train, val = toy_data
    torch.manual_seed(0)
    res = kp.compress(TinyNet(width=32), dataclasses.replace(recipe, ignored_layers=("features.0",)), train, val,
                      latency=False)
    widths = res.report["widths"]["after"]
    assert widths["features.0"] == 32 and widths["features.3"] < 32  # the other conv carries the cut


def test_globs_bad_names_and_the_flag(toy_data):
    train, val = toy_data
    with pytest.raises(ValueError, match="'stem.*' names no layer of TinyNet"):
        kp.compress(TinyNet(width=32), kp.recipes.L1Finetune(target_flops=0.6, finetune=FT,
                                                             ignored_layers=("stem.*",)), train, val, latency=False)
    args = build_parser().parse_args(["compress", "--from", "x", "--out", "y", "--method", "l1", "--target-flops",
                                      "0.5", "--ignored-layers", "features.0", "layer1.*"])
    assert build_recipe(args).ignored_layers == ("features.0", "layer1.*")
