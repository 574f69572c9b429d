"""CIFAR-style ResNets of He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2.

Three stages of BasicBlocks with 16/32/64 channels at 32/16/8 px, depth = 6n + 2. Shortcut option
"A" (the paper's CIFAR choice) is parameter-free: stride-2 subsampling plus zero channel padding,
implemented by :class:`PadShortcut` so pruners can recognise it by type. Option "B" uses a 1x1
conv + BN projection wherever the shape changes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdprune.models import MODELS
from kdprune.models.base import ZooModel, kaiming_init

__all__ = ["BasicBlock", "CifarResNet", "PadShortcut", "resnet20", "resnet32", "resnet44",
           "resnet56", "resnet110"]


class PadShortcut(nn.Module):
    """Option-A shortcut of He et al. 2016: subsample by ``stride`` and zero-pad channels.

    Input channel ``src[k]`` lands on output channel ``dst[k]`` and every other output is zero.
    It implements kdprune's channel-placer protocol (``kdprune_channels``,
    ``kdprune_prune_inputs``, ``kdprune_prune_outputs``), so the engine can prune the residual
    streams on both sides: a removed input drops its placement, a removed output its slot.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"PadShortcut cannot shrink channels ({in_planes} -> {out_planes})")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride
        left = (out_planes - in_planes) // 2
        # Not persistent: the placement follows from the structure log replayed on load.
        self.register_buffer("src", torch.arange(in_planes), persistent=False)
        self.register_buffer("dst", torch.arange(in_planes) + left, persistent=False)
        self._padded = True  # still the plain even pad: the fast F.pad path applies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity with stride-``stride`` subsampling and zero channel padding (split evenly)."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        pad = self.out_planes - self.in_planes
        if self._padded:
            return x if pad == 0 else F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))
        out = x.new_zeros(x.shape[0], self.out_planes, *x.shape[2:])
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def kdprune_channels(self) -> tuple[int, int]:
        """(input, output) channel counts."""
        return self.in_planes, self.out_planes

    def kdprune_prune_inputs(self, idxs: list[int]) -> None:
        """Remove input channels ``idxs``: their placements go, the others are renumbered."""
        self.src, self.dst = _drop(self.src, self.dst, idxs, self.in_planes)
        self.in_planes -= len(set(idxs))
        self._padded = False

    def kdprune_prune_outputs(self, idxs: list[int]) -> None:
        """Remove output channels ``idxs``: inputs placed there are no longer used."""
        self.dst, self.src = _drop(self.dst, self.src, idxs, self.out_planes)
        self.out_planes -= len(set(idxs))
        self._padded = False

    def kdprune_zero_outputs(self, idxs: list[int]) -> None:
        """Make output channels ``idxs`` zero (drop what is placed there), widths unchanged."""
        keep = ~torch.isin(self.dst, torch.tensor(list(idxs), dtype=self.dst.dtype, device=self.dst.device))
        self.src, self.dst = self.src[keep], self.dst[keep]
        self._padded = False

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


def _drop(side: torch.Tensor, other: torch.Tensor, idxs: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove channels ``idxs`` from one side of a placement and renumber the survivors."""
    gone = torch.zeros(width, dtype=torch.bool, device=side.device)
    gone[list(idxs)] = True
    renumber = torch.cumsum(~gone, 0) - 1
    keep = ~gone[side]
    return renumber[side[keep]], other[keep]


def _shortcut(in_planes: int, planes: int, stride: int, option: str) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if option == "A":
        return PadShortcut(in_planes, planes, stride)
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an additive shortcut (He et al. 2016, Fig. 2)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)
        self.relu2 = nn.ReLU()

    def residual_parts(self) -> dict[str, str | None]:
        """Block protocol (kdprune.engine.blocks): the shortcut, and the ReLU after the addition."""
        return {"pre": [], "shortcut": "shortcut", "post": "relu2"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(ZooModel):
    """ResNet-(6n+2) for 32x32 inputs, He et al. 2016 Sec. 4.2 (also runs on 28x28)."""

    feature_modules = ["layer1", "layer2", "layer3"]
    classifier_name = "fc"

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        in_chans: int = 3,
        shortcut: str = "A",
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__(num_classes, in_chans)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth, self.shortcut = depth, shortcut
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        planes = widths[0]
        for i, (w, s) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [BasicBlock(planes if j == 0 else w, w, s if j == 0 else 1, shortcut)
                      for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            planes = w
        self.fc = nn.Linear(widths[-1], num_classes)
        kaiming_init(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """3x3 conv-BN-ReLU stem at full resolution (He et al. 2016)."""
        return self.relu(self.bn1(self.conv1(x)))


def _build(depth: int, num_classes: int, in_chans: int, **kwargs: Any) -> CifarResNet:
    return CifarResNet(depth=depth, num_classes=num_classes, in_chans=in_chans, **kwargs)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016); 0.27M params with option A."""
    return _build(20, num_classes, in_chans, **kwargs)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016); 0.46M params with option A."""
    return _build(32, num_classes, in_chans, **kwargs)


@MODELS.register("resnet44")
def resnet44(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2016); 0.66M params with option A."""
    return _build(44, num_classes, in_chans, **kwargs)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016); 0.85M params, ~125.5M MACs at 32x32."""
    return _build(56, num_classes, in_chans, **kwargs)


@MODELS.register("resnet110")
def resnet110(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016); 1.7M params with option A."""
    return _build(110, num_classes, in_chans, **kwargs)
