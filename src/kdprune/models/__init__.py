"""Model zoo: CIFAR/ImageNet CNNs with a shared feature API, built by name from ``MODELS``.

Every model exposes ``forward``, ``forward_features`` (pooled [N, D]), ``forward_head``,
``forward_intermediates`` (logits + stage outputs), ``feature_modules`` (names of the stage modules
for forward hooks), ``classifier_name`` and ``num_classes`` / ``in_chans``.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from torch import nn

from kdprune.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` and attach a JSON-serialisable ``kdprune_spec``."""
    factory = MODELS.get(name)
    spec = {"name": name, "kwargs": {"num_classes": num_classes, "in_chans": in_chans, **kwargs}}
    try:
        json.dumps(spec)
    except TypeError as e:
        raise TypeError(f"create_model kwargs must be JSON-serialisable: {e}") from None
    model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    model.kdprune_spec = spec
    return model


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return MODELS.names()


# Imported after MODELS exists: each module registers its factories on import.
from kdprune.models.base import ZooModel, kaiming_init  # noqa: E402
from kdprune.models.mobilenetv2 import InvertedResidual, MobileNetV2, mobilenetv2  # noqa: E402
from kdprune.models.resnet_cifar import (  # noqa: E402
    BasicBlock,
    CifarResNet,
    PadShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from kdprune.models.resnet_imagenet import (  # noqa: E402
    Bottleneck,
    ImageNetBasicBlock,
    ImageNetResNet,
    resnet18,
    resnet50,
)
from kdprune.models.vgg import VGG, vgg16_bn  # noqa: E402
from kdprune.models.wrn import (  # noqa: E402
    WideBasicBlock,
    WideResNet,
    wrn,
    wrn16_2,
    wrn16_8,
    wrn28_10,
    wrn40_1,
    wrn40_2,
)

__all__ = [
    "MODELS", "create_model", "list_models", "ZooModel", "kaiming_init",
    "BasicBlock", "CifarResNet", "PadShortcut",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "Bottleneck", "ImageNetBasicBlock", "ImageNetResNet", "resnet18", "resnet50",
    "VGG", "vgg16_bn", "InvertedResidual", "MobileNetV2", "mobilenetv2",
    "WideBasicBlock", "WideResNet", "wrn", "wrn16_2", "wrn16_8", "wrn28_10", "wrn40_1", "wrn40_2",
]
