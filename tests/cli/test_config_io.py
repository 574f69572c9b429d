"""YAML and flags fill the same dataclasses; bad keys are clear errors."""
import argparse

import pytest

from kdprune.cli.common import RunConfig, add_data_args, add_train_args, build_run_config
from kdprune.training.config_io import from_dict, to_tagged_dict
from kdprune.training.config import SGD, AdamW, Cosine, OneCycle, TrainConfig


def _parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--model")
    add_data_args(p)
    add_train_args(p)
    return p.parse_args(argv)


def test_roundtrip_through_tagged_dict():
    cfg = TrainConfig(epochs=3, optimizer=AdamW(lr=2e-3, betas=(0.9, 0.99)), schedule=OneCycle(max_lr=0.2))
    assert from_dict(TrainConfig, to_tagged_dict(cfg)) == cfg


def test_yaml_then_flags_win(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: resnet32\ntrain:\n  epochs: 7\n  optimizer: {type: sgd, lr: 0.05}\n  schedule: cosine\n")
    cfg = build_run_config(_parse(["--config", str(tmp_path / "c.yaml"), "--epochs", "9", "--momentum", "0.8"]))
    assert cfg == RunConfig(model="resnet32", train=TrainConfig(
        epochs=9, optimizer=SGD(lr=0.05, momentum=0.8), schedule=Cosine()))


def test_flags_alone_use_dataclass_defaults():
    cfg = build_run_config(_parse(["--optimizer", "adamw", "--lr", "0.01", "--schedule", "onecycle"]))
    assert cfg.train.optimizer == AdamW(lr=0.01) and cfg.train.schedule == OneCycle()
    assert cfg.train.epochs == TrainConfig().epochs


def test_unknown_keys_are_clear(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        build_run_config(_parse(["--config", str(tmp_path / "c.yaml")]))
    with pytest.raises(ValueError, match="unknown type 'rmsprop'"):
        from_dict(TrainConfig, {"optimizer": {"type": "rmsprop"}})
    with pytest.raises(ValueError, match="momentum"):
        build_run_config(_parse(["--optimizer", "adamw", "--momentum", "0.9"]))
