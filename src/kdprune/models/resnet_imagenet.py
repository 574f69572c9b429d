"""ImageNet ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", Table 1).

Module names, parameter/buffer names and shapes match ``torchvision.models.resnet18/50`` exactly
(``conv1``, ``bn1``, ``layer1..4`` with ``.0.conv1`` / ``.0.downsample.0|1``, ``fc``), so
torchvision checkpoints load with ``model.load_state_dict(sd)``. Bottleneck puts the stride on
the 3x3 conv ("ResNet v1.5", as torchvision). ReLUs are separate non-inplace modules (no state,
so keys are unaffected). Global pooling is adaptive, so inputs >= 32x32 work.

Params (1000 classes): resnet18 11,689,512; resnet50 25,557,032 (torchvision's documented counts).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdprune.models import MODELS
from kdprune.models.base import ZooModel, kaiming_init

__all__ = ["Bottleneck", "ImageNetBasicBlock", "ImageNetResNet", "resnet18", "resnet50"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _downsample_parts(block: nn.Module) -> dict[str, object]:
    """Block protocol (kdprune.engine.blocks): the downsample projection (or identity), then the
    block's last ReLU (``POST``)."""
    return {"pre": [], "shortcut": "downsample" if block.downsample is not None else None, "post": block.POST}


class ImageNetBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut (He et al. 2016, ResNet-18/34 block)."""

    expansion = 1
    POST = "relu2"

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu2 = nn.ReLU()
        self.stride = stride

    residual_parts = _downsample_parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck block (He et al. 2016, ResNet-50/101/152; stride on the 3x3)."""

    expansion = 4
    POST = "relu3"

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.relu3 = nn.ReLU()
        self.stride = stride

    residual_parts = _downsample_parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn3(conv3(...conv1(x)...)) + downsample(x))."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ImageNetResNet(ZooModel):
    """ImageNet ResNet with torchvision-compatible state_dict (He et al. 2016)."""

    feature_modules = ["layer1", "layer2", "layer3", "layer4"]
    classifier_name = "fc"

    def __init__(
        self,
        block: type[ImageNetBasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__(num_classes, in_chans)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            self.add_module(f"layer{i}", self._make_layer(block, planes, n, 1 if i == 1 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        kaiming_init(self)
        if zero_init_residual:  # Goyal et al. 2017: each residual branch starts as zero
            for m in self.modules():
                if isinstance(m, (ImageNetBasicBlock, Bottleneck)):
                    nn.init.zeros_(m.bn2.weight if m.expansion == 1 else m.bn3.weight)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out, stride), nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """7x7/2 conv-BN-ReLU and 3x3/2 max-pool stem (He et al. 2016, Table 1)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_pool(self, x: torch.Tensor) -> torch.Tensor:
        """Adaptive global average pooling (torchvision's ``avgpool``) and flatten."""
        return torch.flatten(self.avgpool(x), 1)


@MODELS.register("resnet18")
def resnet18(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ImageNetResNet:
    """ResNet-18 (He et al. 2016), torchvision-compatible keys; 11.69M params at 1000 classes."""
    return ImageNetResNet(ImageNetBasicBlock, [2, 2, 2, 2], num_classes, in_chans, **kwargs)


@MODELS.register("resnet50")
def resnet50(num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ImageNetResNet:
    """ResNet-50 (He et al. 2016), torchvision-compatible keys; 25.56M params at 1000 classes."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, **kwargs)
