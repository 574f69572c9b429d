"""The example YAML files in configs/ parse into the dataclasses they claim to fill."""
import argparse
from pathlib import Path

from kdprune.cli.compress_cmd import build_recipe
from kdprune.cli.main import build_parser

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_train_yaml():
    from kdprune.cli.common import build_run_config

    args = _args(["train", "--config", str(CONFIGS / "resnet20_fmnist.yaml"), "--out", "x"])
    cfg = build_run_config(args)
    assert cfg.model == "resnet20" and cfg.train.epochs == 15 and cfg.train.optimizer.lr == 0.1


def test_compress_yaml():
    args = _args(["compress", "--config", str(CONFIGS / "compress_kd50.yaml"), "--from", "x", "--out", "y"])
    recipe = build_recipe(args)
    assert type(recipe).__name__ == "KDFinetune" and recipe.target_flops == 0.5
    assert recipe.finetune.epochs == 4 and recipe.finetune.optimizer.lr == 0.01
