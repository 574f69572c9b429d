"""Wide Residual Networks (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), CIFAR form.

WRN-d-k: 3x3 stem to 16 channels, three groups of n = (d-4)/6 pre-activation basic blocks with
16k/32k/64k channels at strides 1/2/2, then BN-ReLU, global average pooling and a linear layer.
Structure follows the authors' code (and xternalz/WideResNet-pytorch): where a block changes shape,
both branches start from the shared BN-ReLU pre-activation and the shortcut is a 1x1 conv.

Params (10 classes, 3 in-channels): WRN-16-8 10,961,370 (paper Table 4: 11.0M);
WRN-28-10 36,479,194 (paper: 36.5M).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdprune.models import MODELS
from kdprune.models.base import ZooModel, kaiming_init

__all__ = ["WideBasicBlock", "WideResNet", "wrn", "wrn16_2", "wrn16_8", "wrn28_10", "wrn40_1",
           "wrn40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block B(3,3) with optional dropout (Zagoruyko & Komodakis 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = stride == 1 and in_planes == planes
        self.shortcut = (
            nn.Identity()
            if self.equal_in_out
            else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def residual_parts(self) -> dict[str, object]:
        """Block protocol: identity shortcut, or a projection of the pre-activated input."""
        if self.equal_in_out:
            return {"pre": [], "shortcut": None, "post": None}
        return {"pre": ["bn1", "relu1"], "shortcut": "shortcut", "post": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv2(drop(relu(bn2(conv1(relu(bn1(x))))))) + shortcut (He et al. 2016b pre-act)."""
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        identity = x if self.equal_in_out else self.shortcut(pre)
        return out + identity


class WideResNet(ZooModel):
    """WRN-depth-widen_factor for 32x32 / 28x28 inputs (Zagoruyko & Komodakis 2016)."""

    feature_modules = ["block1", "block2", "block3"]
    classifier_name = "fc"

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 8,
        num_classes: int = 10,
        in_chans: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, float(dropout)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        for i, stride in enumerate((1, 2, 2), start=1):
            blocks = [WideBasicBlock(widths[i - 1] if j == 0 else widths[i], widths[i],
                                     stride if j == 0 else 1, dropout) for j in range(n)]
            self.add_module(f"block{i}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)
        nn.init.zeros_(self.fc.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Plain 3x3 conv stem, no BN/ReLU (pre-activation nets, Zagoruyko & Komodakis 2016)."""
        return self.conv1(x)

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """Final BN-ReLU of the pre-activation design (He et al. 2016b) before pooling."""
        return self.relu(self.bn(x))


def wrn(depth: int, widen_factor: int, num_classes: int = 10, in_chans: int = 3,
        **kwargs: Any) -> WideResNet:
    """Generic WRN-depth-k builder (Zagoruyko & Komodakis 2016); kwargs: dropout."""
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_chans=in_chans, **kwargs)


@MODELS.register("wrn16_8")
def wrn16_8(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> WideResNet:
    """WRN-16-8 (Zagoruyko & Komodakis 2016), 11.0M params."""
    return wrn(16, 8, num_classes, in_chans, **kwargs)


@MODELS.register("wrn28_10")
def wrn28_10(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> WideResNet:
    """WRN-28-10 (Zagoruyko & Komodakis 2016), 36.5M params."""
    return wrn(28, 10, num_classes, in_chans, **kwargs)


@MODELS.register("wrn40_2")
def wrn40_2(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> WideResNet:
    """WRN-40-2 (Zagoruyko & Komodakis 2016), the usual KD teacher of Tian et al. 2020 (CRD)."""
    return wrn(40, 2, num_classes, in_chans, **kwargs)


@MODELS.register("wrn40_1")
def wrn40_1(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> WideResNet:
    """WRN-40-1 (Zagoruyko & Komodakis 2016), a KD student in Tian et al. 2020 (CRD)."""
    return wrn(40, 1, num_classes, in_chans, **kwargs)


@MODELS.register("wrn16_2")
def wrn16_2(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> WideResNet:
    """WRN-16-2 (Zagoruyko & Komodakis 2016), a KD student in Tian et al. 2020 (CRD)."""
    return wrn(16, 2, num_classes, in_chans, **kwargs)
