"""CIFAR VGG-16-BN (Simonyan & Zisserman 2015; CIFAR form of Li et al. 2017 / Liu et al. 2017).

13 conv3x3-BN-ReLU layers, cfg 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M, then global average
pooling to 512 and a single ``Linear(512, num_classes)``: the widely used CIFAR VGG-16 of
kuangliu/pytorch-cifar and the network-slimming code base (Liu et al. 2017), i.e. *not* the
ImageNet 4096-4096 classifier nor PFEC's extra 512-512 FC + BN1d layer. Convs have no bias (it is
redundant before BN), as in network-slimming and PFEC. At 32x32 the last max-pool leaves 1x1, so the
pooling equals flattening; max-pools use ``ceil_mode=True`` so 28x28 inputs shrink
28-14-7-4-2-1 instead of reaching 0 (identical output sizes at 32x32).

Params (10 classes, 3 in-channels): 14,724,042 = 14,710,464 conv + 8,448 BN + 5,130 FC.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from kdprune.models import MODELS
from kdprune.models.base import ZooModel, kaiming_init

__all__ = ["VGG", "VGG16_CFG", "vgg16_bn"]

# Simonyan & Zisserman 2015, Table 1 column D; "M" = 2x2 max-pool ending a stage.
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                              512, 512, 512, "M", 512, 512, 512, "M"]


def _split_stages(cfg: Sequence[int | str]) -> list[list[int]]:
    stages: list[list[int]] = [[]]
    for v in cfg:
        if v == "M":
            stages.append([])
        else:
            stages[-1].append(int(v))
    return [s for s in stages if s]


def _make_stage(in_ch: int, widths: list[int], pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
    if pool:
        layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    return nn.Sequential(*layers)


class VGG(ZooModel):
    """VGG with BN for small images (Simonyan & Zisserman 2015), one Sequential per stage."""

    classifier_name = "classifier"

    def __init__(
        self,
        cfg: Sequence[int | str] = tuple(VGG16_CFG),
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__(num_classes, in_chans)
        self.cfg = list(cfg)
        stages = _split_stages(self.cfg)
        n_pools = sum(1 for v in self.cfg if v == "M")
        self.features = nn.Sequential()
        in_ch = in_chans
        for i, widths in enumerate(stages):
            self.features.append(_make_stage(in_ch, widths, pool=i < n_pools))
            in_ch = widths[-1]
        # Instance attribute: the number of stages depends on cfg.
        self.feature_modules = [f"features.{i}" for i in range(len(stages))]
        self.classifier = nn.Linear(in_ch, num_classes)
        kaiming_init(self)


@MODELS.register("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> VGG:
    """CIFAR VGG-16-BN (Simonyan & Zisserman 2015; Liu et al. 2017 head), 14.72M params."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_chans=in_chans, **kwargs)
