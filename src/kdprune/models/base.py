"""Shared classifier interface for the model zoo (timm-style feature API) and weight init."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZooModel", "kaiming_init"]


def kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) conv init of He et al. 2015; BN weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ZooModel(nn.Module):
    """Base CNN classifier: stem -> stages (``feature_modules``) -> neck -> global pool -> head.

    Subclasses build the modules, set ``feature_modules`` (dotted names of the stage modules, in
    execution order) and ``classifier_name`` (attribute holding the final ``nn.Linear``), and
    override ``forward_stem`` / ``forward_neck`` where they do more than nothing.  ``forward``,
    ``forward_features`` and ``forward_intermediates`` all run the same module sequence, so forward
    hooks on the ``feature_modules`` names see exactly what ``forward_intermediates`` returns.
    """

    feature_modules: ClassVar[list[str]] = []
    classifier_name: ClassVar[str] = "fc"

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"num_classes, in_chans must be >= 1: {num_classes}, {in_chans}")
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)

    def residual_blocks(self) -> list[str]:
        """Block protocol (kdprune.engine.blocks): names of the submodules whose
        ``residual_parts()`` says they are residual blocks, in module order."""
        return [n for n, m in self.named_modules()
                if callable(getattr(m, "residual_parts", None)) and m.residual_parts() is not None]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Layers before the first stage (identity by default)."""
        return x

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """Layers between the last stage and global pooling (identity by default)."""
        return x

    def forward_pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pooling to a flat [N, D] feature (Lin et al. 2014, Network in Network)."""
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def _stages(self, x: torch.Tensor, keep: list[torch.Tensor] | None) -> torch.Tensor:
        x = self.forward_stem(x)
        for name in self.feature_modules:
            x = self.get_submodule(name)(x)
            if keep is not None:
                keep.append(x)
        return self.forward_pool(self.forward_neck(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, flattened penultimate features [N, D] (the input of the classifier)."""
        return self._stages(x, None)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Classifier logits from pooled features."""
        return self.get_classifier()(feats)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the output of every stage in ``feature_modules`` (timm-style)."""
        feats: list[torch.Tensor] = []
        logits = self.forward_head(self._stages(x, feats))
        return logits, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        """The final ``nn.Linear`` (named by ``classifier_name``)."""
        return self.get_submodule(self.classifier_name)

    @property
    def num_features(self) -> int:
        """Width D of ``forward_features`` (in_features of the classifier)."""
        return self.get_classifier().in_features
