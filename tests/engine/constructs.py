"""Architectures we did not design the engine for, one per construct the engine must handle:
ResNeXt (grouped bottleneck), RegNet (grouped + SE), ShuffleNet v1 (grouped 1x1 + channel shuffle),
ShuffleNet v2 (split + shuffle + concat), dual path (slice + add + concat), a separable cell with
a channel multiplier, and an option-A ResNet. Written the way third-party code writes them
(functional shuffles, inline slicing), small enough for CPU tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _Head(nn.Module):
    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, cout: int, width: int, cardinality: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups=cardinality)
        self.conv3 = conv_bn(width, cout, 1, act=False)
        self.proj = conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.proj(x))


class ResNeXtNet(nn.Module):
    """ResNeXt-style: grouped 3x3 inside each bottleneck (cardinality 4)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(ResNeXtBlock(16, 32, 16, 4, 1), ResNeXtBlock(32, 32, 16, 4, 1),
                                    ResNeXtBlock(32, 64, 32, 4, 2), ResNeXtBlock(64, 64, 32, 4, 1))
        self.head = _Head(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class SE(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class RegNetBlock(nn.Module):
    """RegNetY: 1x1 -> grouped 3x3 (group width 8) -> SE -> 1x1, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8) -> None:
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SE(cout, max(4, cin // 4))
        self.c = conv_bn(cout, cout, 1, act=False)
        self.proj = conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sc = x if self.proj is None else self.proj(x)
        return F.relu(sc + self.c(self.se(self.b(self.a(x)))))


class RegNetNet(nn.Module):
    """RegNetY-style: grouped convs + squeeze-excitation."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, stride=1)
        self.blocks = nn.Sequential(RegNetBlock(16, 32, 1), RegNetBlock(32, 32, 1),
                                    RegNetBlock(32, 64, 2), RegNetBlock(64, 64, 1))
        self.head = _Head(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleV1Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int = 2) -> None:
        super().__init__()
        mid = cout // 4 if stride == 1 else (cout - cin) // 4
        self.stride, self.groups = stride, groups
        self.g1 = conv_bn(cin, mid * 1 if stride == 1 else mid, 1, groups=groups)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, act=False)
        self.g2 = conv_bn(mid, cout if stride == 1 else cout - cin, 1, groups=groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.g2(self.dw(channel_shuffle(self.g1(x), self.groups)))
        if self.stride == 1:
            return F.relu(out + x)
        return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), out], 1))


class ShuffleV1Net(nn.Module):
    """ShuffleNet v1-style: grouped 1x1 convs, functional channel shuffle, concat downsampling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        # widths as in ShuffleNet v1 (g=2): each unit's 1x1 -> shuffle -> 1x1 ties channels in classes
        # of g*g, so its middle width needs a few dozen channels for targets to land within 1%
        self.units = nn.Sequential(ShuffleV1Unit(16, 112, 2), ShuffleV1Unit(112, 112, 1), ShuffleV1Unit(112, 112, 1))
        self.head = _Head(112, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(self.stem(x)))


class ShuffleV2Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        b_in = cin if stride == 2 else cin // 2
        self.branch = nn.Sequential(conv_bn(b_in, half, 1), conv_bn(half, half, 3, stride, groups=half, act=False),
                                    conv_bn(half, half, 1))
        self.down = (nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, act=False), conv_bn(cin, half, 1))
                     if stride == 2 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is None:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch(b)], 1)
        else:
            out = torch.cat([self.down(x), self.branch(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleV2Net(nn.Module):
    """ShuffleNetV2-style: channel split, concat, channel shuffle."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.units = nn.Sequential(ShuffleV2Unit(16, 32, 2), ShuffleV2Unit(32, 32, 1), ShuffleV2Unit(32, 32, 1))
        self.last = conv_bn(32, 64, 1)
        self.head = _Head(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.units(self.stem(x))))


class DualPathBlock(nn.Module):
    def __init__(self, c: int, d: int, grow: int) -> None:
        super().__init__()
        self.d = d
        self.branch = nn.Sequential(conv_bn(c, 16, 1), conv_bn(16, 16, 3), conv_bn(16, d + grow, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        d = self.d
        return F.relu(torch.cat([x[:, :d] + y[:, :d], x[:, d:], y[:, d:]], 1))


class DualPathNet(nn.Module):
    """Dual path (DPN-style): residual part by slice + add, dense part by concat."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 24)
        self.b1 = DualPathBlock(24, 16, 8)
        self.b2 = DualPathBlock(32, 16, 8)
        self.head = _Head(40, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.stem(x))))


class SeparableNet(nn.Module):
    """Separable cells whose depthwise conv has a channel multiplier (groups=in, out=2*in)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.cells = nn.Sequential(*[nn.Sequential(conv_bn(c, 2 * c, 3, s, groups=c, act=False), conv_bn(2 * c, o, 1))
                                     for c, o, s in ((16, 32, 1), (32, 32, 2), (32, 48, 1))])
        self.head = _Head(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cells(self.stem(x)))


CONSTRUCTS = {
    "resnext": ResNeXtNet, "regnet": RegNetNet, "shufflev1": ShuffleV1Net, "shufflev2": ShuffleV2Net,
    "dualpath": DualPathNet, "separable": SeparableNet,
}
