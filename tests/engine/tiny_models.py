"""Tiny models and helpers for the engine/io tests (importable as tests.engine.tiny_models)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdprune.engine import ChannelGroup, PruningPlan
from kdprune.engine.graph import is_placer


def cbr(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv3x3-BN-ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ChainNet(nn.Module):
    """conv-BN-ReLU -> conv(+bias, no BN)-ReLU -> conv-BN-ReLU -> pool -> fc."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=True)
        self.conv3, self.bn3 = nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ChannelPad(nn.Module):
    """Option-A shortcut: parameter-free stride-2 subsample + zero channel pad."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class Block(nn.Module):
    """Basic residual block; shortcut 'A' (ChannelPad), 'B' (1x1 conv + BN) or identity."""

    def __init__(self, cin: int, cout: int, stride: int, option: str = "B") -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif option == "A":
            self.shortcut = ChannelPad(cout - cin)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MiniRes(nn.Module):
    """stem -> block(8->8) -> block(8->16, /2) -> block(16->16) -> pool -> fc."""

    classifier_name = "head"

    def __init__(self, option: str = "B", num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.layer1 = Block(8, 8, 1, option)
        self.layer2 = nn.Sequential(Block(8, 16, 2, option), Block(16, 16, 1, option))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UserNet(nn.Module):
    """Not in the zoo: two branches concatenated (torch.cat), a depthwise conv over the concat,
    a pointwise projection added back to the stem (residual add), and a hidden Linear+BN1d."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.branch_a = cbr(8, 6)
        self.branch_b = cbr(8, 10)
        self.dw = cbr(16, 16, groups=16)
        self.pw = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.hidden = nn.Linear(8, 12)
        self.hidden_bn = nn.BatchNorm1d(12)
        self.out = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.cat([self.branch_a(s), self.branch_b(s)], dim=1)
        y = F.relu(self.pw(self.dw(y)) + s)
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return self.out(F.relu(self.hidden_bn(self.hidden(y))))


def make_user_net() -> UserNet:
    """Zero-arg factory for save/load via factory."""
    torch.manual_seed(0)
    return UserNet()


class GroupedNet(nn.Module):
    """A non-depthwise grouped conv (groups=2): its groups are pruned in tie classes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.g = cbr(8, 8, groups=2)
        self.b = cbr(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.g(self.a(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MultiplierNet(nn.Module):
    """A depthwise conv with a channel multiplier (groups=in=8, out=16): removing one of its input
    channels removes its conv group (2 output channels), so both sides are one linked group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.g = cbr(8, 16, groups=8)
        self.b = cbr(16, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.g(self.a(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideNet(nn.Module):
    """Plain conv stack (several 64-wide layers): fine-grained enough for 1% FLOPs targets."""

    def __init__(self, width: int = 64, depth: int = 5) -> None:
        super().__init__()
        layers, cin = [], 3
        for _ in range(depth):
            layers.append(cbr(cin, width))
            cin = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


@torch.no_grad()
def randomize(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random BN affine params, then running stats calibrated on a random batch (so activations
    stay O(1) even in deep nets); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives exact batch statistics
    model.train()
    model(torch.randn(8, *x.shape[1:], generator=g))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def random_plan(groups: Sequence[ChannelGroup], seed: int = 0, max_frac: float = 0.75) -> PruningPlan:
    """Each group loses a random subset (at most max_frac of it, at least one channel kept), in
    whole tie classes where grouped convs tie channels."""
    g = torch.Generator().manual_seed(seed)
    removals = {}
    for grp in groups:
        classes = grp.ties or tuple((i,) for i in range(grp.channels))
        k = int(torch.randint(0, int(max_frac * len(classes)) + 1, (1,), generator=g))
        k = min(k, len(classes) - 1)
        removals[grp.root] = [i for c in torch.randperm(len(classes), generator=g)[:k].tolist() for i in classes[c]]
    return PruningPlan(removals)


@torch.no_grad()
def zero_removed(model: nn.Module, groups: Sequence[ChannelGroup], plan: PruningPlan) -> nn.Module:
    """Deep copy with the planned channels zeroed by hand at each group's sites: BN gamma and beta,
    or conv/linear weight and bias when no BN follows."""
    ref = copy.deepcopy(model).eval()
    for grp in groups:
        removed = set(plan.removals.get(grp.root, ()))
        for site in grp.sites:
            member = grp.member(site)
            local = [i for i, r in zip(member.idxs, member.root_idxs) if r in removed]
            mod = ref.get_submodule(site)
            if is_placer(mod):
                if local:
                    mod.kdprune_zero_outputs(local)
                continue
            mod.weight[local] = 0
            if mod.bias is not None:
                mod.bias[local] = 0
    return ref


class DualPath(nn.Module):
    """Dual-path block (DPN-style): cat([a[:, :d] + b[:, :d], a[:, d:], b[:, d:]]) over channels."""

    def __init__(self, c: int = 16, d: int = 8) -> None:
        super().__init__()
        self.d = d
        self.stem = cbr(3, c)
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.head = cbr(d + 2 * (c - d), 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        a, b, d = self.a(s), self.b(s), self.d
        h = torch.cat([a[:, :d] + b[:, :d], a[:, d:], b[:, d:]], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(h), 1), 1))
