"""ignored_layers on every channel-pruning recipe: the named (or globbed) layers keep their width."""
from __future__ import annotations

import pytest
import torch

import kdprune as kp
from kdprune.cli.compress_cmd import build_recipe
from kdprune.cli.main import build_parser

from ..conftest import TinyNet

FT = kp.TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=2, progress=False)
RECIPES = [
    kp.recipes.L1Finetune(target_flops=0.6, finetune=FT),
    kp.recipes.KDFinetune(target_flops=0.6, finetune=FT),
    kp.recipes.GroupNorm(target_flops=0.6, sparse=FT, finetune=FT),
    kp.recipes.SDAP(target_flops=0.6, ramp_epochs=1, finetune=kp.TrainConfig(epochs=2, batch_size=32, progress=False)),
    kp.recipes.KESI(target_flops=0.6, rounds=1, retrain_epochs=1, distill_epochs=1, finetune=FT),
    kp.recipes.EDP(target_flops=0.85, sparse=FT, finetune=FT),
    kp.recipes.Cascade(target_flops=0.6, assistants=0, cascade=FT, finetune=FT),
    kp.recipes.TPMagnitude(target_flops=0.6, finetune=FT),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: type(r).__name__)
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
