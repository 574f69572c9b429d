"""More architectures we did not design the engine for: channel splits, slices, partial adds,
convs that transform their weight and attention across channels. Written the way third-party zoos
write them (sizes kept in attributes, inline ``torch.split`` / ``x[:, a:b]``), small enough for CPU
tests; one net per construct of issue 31."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .constructs import DualPathBlock, ShuffleV2Unit, _Head, conv_bn


class CSPStage(nn.Module):
    """Cross-stage partial: split the channels in two, one half through blocks, concat back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand = conv_bn(c, 2 * c, 1)
        self.half = c
        self.blocks = nn.Sequential(conv_bn(c, c, 3), conv_bn(c, c, 3))
        self.transition = conv_bn(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.expand(x).split(self.half, dim=1)
        return self.transition(torch.cat([xs, self.blocks(xb)], dim=1))


class CSPNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.stages = nn.Sequential(CSPStage(16), conv_bn(16, 32, 3, 2), CSPStage(32))
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class Res2Block(nn.Module):
    """Res2Net: split into s parts, y_i = conv(x_i + y_{i-1}), concat, 1x1, residual add."""

    def __init__(self, c: int, width: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.width, self.scale = width, scale
        self.conv1 = conv_bn(c, width * scale, 1)
        self.convs = nn.ModuleList(conv_bn(width, width, 3) for _ in range(scale - 1))
        self.conv3 = conv_bn(width * scale, c, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.conv1(x), self.width, 1)
        outs, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            sp = conv(spx[i] if i == 0 else sp + spx[i])
            outs.append(sp)
        outs.append(spx[self.scale - 1])
        return F.relu(self.conv3(torch.cat(outs, 1)) + x)


class Res2Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 24)
        self.blocks = nn.Sequential(Res2Block(24), Res2Block(24))
        self.head = _Head(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class MixConv(nn.Module):
    """Mixed kernels: uneven ``torch.split`` of the channels, a different kernel per part, concat."""

    def __init__(self, c: int, splits: tuple[int, ...] = (8, 8, 16)) -> None:
        super().__init__()
        assert sum(splits) == c
        self.splits = list(splits)
        self.convs = nn.ModuleList(nn.Conv2d(s, s, 3 + 2 * i, padding=1 + i, groups=s, bias=False)
                                   for i, s in enumerate(splits))
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return F.relu(self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)))


class MixNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 1)
        self.blocks = nn.Sequential(MixConv(32), conv_bn(32, 32, 1), MixConv(32, (16, 8, 8)), conv_bn(32, 32, 1))
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class GhostModule(nn.Module):
    """GhostNet: primary conv + cheap depthwise conv, concat, then ``out[:, :oup]``."""

    def __init__(self, cin: int, oup: int, ratio: int = 2) -> None:
        super().__init__()
        self.oup = oup
        init = math.ceil(oup / ratio)
        self.primary = conv_bn(cin, init, 1)
        self.cheap = conv_bn(init, init * (ratio - 1), 3, groups=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.oup]


class GhostNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(GhostModule(16, 31), conv_bn(31, 32, 3, 2), GhostModule(32, 47))
        self.head = _Head(47, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class SelectiveKernel(nn.Module):
    """SKNet: branches summed, attention split per branch, softmax over branches, weighted sum."""

    def __init__(self, c: int, branches: int = 2, r: int = 8) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1 + i, dilation=1 + i, bias=False),
                                                    nn.BatchNorm2d(c), nn.ReLU()) for i in range(branches))
        self.reduce = conv_bn(c, r, 1)
        self.select = nn.Conv2d(r, c * branches, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.stack([b(x) for b in self.branches], 1)  # (B, n, C, H, W)
        attn = self.select(self.reduce(feats.sum(1).mean((2, 3), keepdim=True)))
        b, n, c = feats.shape[0], feats.shape[1], feats.shape[2]
        attn = attn.view(b, n, c, 1, 1).softmax(dim=1)
        return (feats * attn).sum(1)


class SKNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(SelectiveKernel(16), conv_bn(16, 32, 3, 2), SelectiveKernel(32))
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv: each output filter normalised to zero mean, unit variance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSNet(nn.Module):
    """Weight-standardised convs + GroupNorm-free BN (BiT-style stem and blocks)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.ModuleList(StdConv2d(a, b, 3, s, 1, bias=False) for a, b, s in ((3, 16, 1), (16, 32, 2),
                                                                                        (32, 32, 1)))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in (16, 32, 32))
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return self.head(x)


class ECA(nn.Module):
    """Efficient channel attention: a 1-D conv across the pooled channels, sigmoid, rescale."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3), keepdim=True)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y)


class ECANet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(conv_bn(16, 32, 3, 2), ECA(), conv_bn(32, 32, 3), ECA())
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class PartialResBlock(nn.Module):
    """Partial residual (PyramidNet-style): the output is wider than the input, and the shortcut is
    added to its first channels only: ``out[:, :c] += shortcut``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3), conv_bn(cout, cout, 3, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out[:, :x.shape[1]] += x
        return F.relu(out)


class PartialResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(PartialResBlock(16, 24), PartialResBlock(24, 32))
        self.head = _Head(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))




class Composite(nn.Module):
    """About 50 convs of every construct above at once (a stand-in for a third-party zoo net at
    64x64): the time bound of discovery + prune_to_target is measured on it."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        self.body = nn.Sequential(
            CSPStage(32), Res2Block(32), MixConv(32), GhostModule(32, 31), conv_bn(31, 32, 3, 2),
            SelectiveKernel(32), ECA(), PartialResBlock(32, 40), conv_bn(40, 48, 1), ShuffleV2Unit(48, 48, 1),
            DualPathBlock(48, 32, 8), conv_bn(56, 64, 3, 2), CSPStage(64), Res2Block(64, 16),
            MixConv(64, (16, 16, 32)), CSPStage(64), Res2Block(64, 16), GhostModule(64, 63))
        self.head = _Head(63, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


SPLIT_CONSTRUCTS = {
    "csp": CSPNet, "res2net": Res2Net, "mixconv": MixNet, "ghost": GhostNet, "sk": SKNet, "ws": WSNet,
    "eca": ECANet, "partialres": PartialResNet,
    "composite": Composite,
}


class DerivedCSPStage(CSPStage):
    """CSP as a third-party zoo writes it: the split size derived from an attribute (``self.expand_chs // 2``)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        del self.half
        self.expand_chs = 2 * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.expand(x).split(self.expand_chs // 2, dim=1)
        return self.transition(torch.cat([xs, self.blocks(xb)], dim=1))


class DerivedCSPNet(CSPNet):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.stages = nn.Sequential(DerivedCSPStage(16), conv_bn(16, 32, 3, 2), DerivedCSPStage(32))


SPLIT_CONSTRUCTS["csp-derived"] = DerivedCSPNet
