"""Planted redundancy for the methods' mechanism tests: a small trained BatchNorm net whose first conv
is widened by dead channels (zero filters, BatchNorm gamma = beta = 0), so that layer is over-wide."""
from __future__ import annotations

import pytest
import torch

import kdprune as kp


class Planted(torch.nn.Module):
    """conv1 (``live`` channels, widened by dead ones: zero filters, BN gamma = beta = 0) -> conv2."""

    def __init__(self, live: int = 4, width: int = 16) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, live, 3, padding=1, bias=False), torch.nn.BatchNorm2d(live)
        self.conv2, self.bn2 = torch.nn.Conv2d(live, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        self.fc = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))

    @torch.no_grad()
    def widen(self, width: int = 16) -> "Planted":
        """conv1 widened to ``width`` by dead channels: the function is unchanged."""
        live = self.conv1.out_channels
        conv1, bn1 = torch.nn.Conv2d(1, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        conv1.weight.zero_()[:live] = self.conv1.weight
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn1, name)
            t.zero_()[:live] = getattr(self.bn1, name)
        bn1.running_var[live:] = 1.0
        conv2 = torch.nn.Conv2d(width, self.conv2.out_channels, 3, padding=1, bias=False)
        conv2.weight[:, :live] = self.conv2.weight  # the dead inputs keep their random weights
        self.conv1, self.bn1, self.conv2 = conv1, bn1, conv2
        return self


@pytest.fixture
def planted(toy_data) -> Planted:
    """Planted redundancy: conv1 has 28 dead channels of 32 (the function is the trained 4-channel one's)."""
    train, val = toy_data
    torch.manual_seed(0)
    cfg = kp.TrainConfig(epochs=8, batch_size=16, optimizer=kp.SGD(lr=0.05), progress=False)
    net = kp.train(Planted(width=32), train, val, cfg).model
    dense = kp.training.evaluate(net, val)["top1"]
    net.widen(32)
    assert kp.training.evaluate(net, val)["top1"] == dense  # dead channels change nothing
    return net
