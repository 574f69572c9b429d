"""CIFAR MobileNetV2 (Sandler et al. 2018, "Inverted Residuals and Linear Bottlenecks").

Blocks follow the paper (and torchvision): 1x1 expansion (skipped when t=1) -> 3x3 depthwise ->
linear 1x1 projection, ReLU6, residual only when stride 1 and in == out channels. For 32x32 inputs
the stem and the second bottleneck group use stride 1 instead of 2 (as in kuangliu/pytorch-cifar),
so the total stride is 8: 32 -> 32 -> 32 -> 16 -> 8 -> 8 -> 4 -> 4. Unlike kuangliu's variant there
are no 1x1 projection shortcuts on channel-changing blocks (those are not in the paper).

Params (10 classes, 3 in-channels, width_mult 1.0): 2,236,682, i.e. torchvision's mobilenet_v2
(3,504,872) minus its 1000-way classifier (1,281,000) plus a 10-way one (12,810).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdprune.models import MODELS
from kdprune.models.base import ZooModel, kaiming_init

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenetv2", "make_divisible"]

# (expansion t, out channels c, repeats n, first stride s); Sandler et al. 2018 Table 2 with the
# CIFAR stride change of the second row (2 -> 1).
CIFAR_SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` (never below 90%), as in the MobileNetV2 code."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (Sandler et al. 2018, Fig. 3b / Table 1)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_planes * expand_ratio))
        self.use_res = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(in_planes, hidden, 1))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)

    def residual_parts(self) -> dict[str, object] | None:
        """Block protocol: identity shortcut when the block is residual, else None."""
        return {"pre": [], "shortcut": None, "post": None} if self.use_res else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + block(x) when shapes allow, else block(x) (linear bottleneck, no final ReLU)."""
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(ZooModel):
    """MobileNetV2 for 32x32 / 28x28 inputs (Sandler et al. 2018; CIFAR strides of kuangliu)."""

    feature_modules = [f"blocks.{i}" for i in range(len(CIFAR_SETTINGS))]
    classifier_name = "classifier"

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width_mult: float = 1.0,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans)
        self.width_mult, self.drop_rate = float(width_mult), float(drop_rate)
        in_ch = make_divisible(32 * width_mult)
        last_ch = make_divisible(1280 * max(1.0, width_mult))
        self.stem = _conv_bn_act(in_chans, in_ch, 3, stride=1)
        self.blocks = nn.Sequential()
        for t, c, n, s in CIFAR_SETTINGS:
            out_ch = make_divisible(c * width_mult)
            group = [InvertedResidual(in_ch if i == 0 else out_ch, out_ch, s if i == 0 else 1, t)
                     for i in range(n)]
            self.blocks.append(nn.Sequential(*group))
            in_ch = out_ch
        self.conv_head = _conv_bn_act(in_ch, last_ch, 1)
        self.classifier = nn.Linear(last_ch, num_classes)
        kaiming_init(self)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-1 3x3 conv-BN-ReLU6 stem (CIFAR change of Sandler et al. 2018)."""
        return self.stem(x)

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """Final 1x1 conv to 1280 channels (Sandler et al. 2018, Table 2)."""
        return self.conv_head(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Optional dropout then the linear classifier (Sandler et al. 2018)."""
        if self.drop_rate > 0:
            feats = F.dropout(feats, self.drop_rate, self.training)
        return self.classifier(feats)


@MODELS.register("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> MobileNetV2:
    """CIFAR MobileNetV2 (Sandler et al. 2018), 2.24M params at width_mult=1; kwargs: width_mult."""
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, **kwargs)
