"""Test-only pieces for the loop's extension points: a BN-free net and a two-model task."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainNet(nn.Module):
    """Conv-ReLU x2 + linear head, no BN or dropout: data-parallel equals one process exactly."""

    def __init__(self, in_chans: int = 1, num_classes: int = 4, width: int = 6) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MutualTask:
    """Two models trained together (deep mutual learning, Zhang et al. 2018): the student and a
    peer each get CE plus KL to the other's detached prediction. The peer is the task's own
    trainable module, scored at evaluation as "peer"."""

    def __init__(self, peer: nn.Module, beta: float = 0.5) -> None:
        self.peer, self.beta = peer, beta

    def __call__(self, model, x, y):
        logits, peer_logits = model(x), self.peer(x)
        kl = lambda s, t: F.kl_div(F.log_softmax(s, 1), F.softmax(t.detach(), 1), reduction="batchmean")  # noqa: E731
        terms = {"ce": F.cross_entropy(logits, y), "peer_ce": F.cross_entropy(peer_logits, y),
                 "mutual": self.beta * (kl(logits, peer_logits) + kl(peer_logits, logits))}
        return logits, terms

    def modules(self) -> list[nn.Module]:
        return [self.peer]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"peer": self.peer}

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"": model, "peer": self.peer}
