"""A tiny bench: a ResNet-20 for 4 classes saved as the base, toy 8x8 images, 2-step epochs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import kdprune as kp
from kdprune.bench import config_from_dict
from kdprune.data import ImageDataset

from ..conftest import make_images


def tiny_base(root: Path) -> Path:
    """The base model saved with kp.save_pruned under ``root/base``."""
    torch.manual_seed(0)
    return kp.save_pruned(kp.create_model("resnet20", num_classes=4, in_chans=1), root / "base")


def tiny_data() -> tuple[ImageDataset, ImageDataset]:
    """(train, test) toy images; test normalised like train."""
    train, t = make_images(96, seed=0), make_images(32, seed=1)
    return train, ImageDataset(t.images, t.labels, t.classes, train.mean, train.std, "toy")


def tiny_config(root: Path, **over: Any):
    """A bench config under ``root`` (base saved there): l1 and tp-magnitude at 50% FLOPs."""
    tiny_base(root)
    d = {"name": "tiny", "base": "base", "data": {"train_images": 64, "val_split": 16}, "seeds": [0, 1],
         "targets": [{"flops": 0.5}],
         "budget": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 2, "threads": 1},
         "methods": [{"label": "l1", "method": "l1"}, {"label": "tpm", "method": "tp-magnitude"}],
         "latency": {"batch_sizes": [1, 4], "rounds": 2},
         "results": "results/tiny.jsonl", "runs": "runs", **over}
    return config_from_dict(d, root=root)
