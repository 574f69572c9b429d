"""Shared checks for the model zoo: the feature API contract every model must honour."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from kdprune.models import create_model


def _check_feature_api(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """forward == head(features) == intermediates logits; hooks on feature_modules see stages."""
    model.eval()
    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone()))
        for name in model.feature_modules
    ]
    try:
        with torch.no_grad():
            logits = model(x)
            feats = model.forward_features(x)
            head = model.forward_head(feats)
            captured.clear()
            inter_logits, inter = model.forward_intermediates(x)
    finally:
        for h in handles:
            h.remove()
    assert logits.shape == (x.shape[0], model.num_classes)
    assert feats.shape == (x.shape[0], model.num_features)
    assert getattr(model, model.classifier_name) is model.get_classifier()
    assert isinstance(model.get_classifier(), nn.Linear)
    torch.testing.assert_close(head, logits)
    torch.testing.assert_close(inter_logits, logits)
    assert len(inter) == len(model.feature_modules) > 0
    assert list(captured) == list(model.feature_modules)
    for name, t in zip(model.feature_modules, inter):
        torch.testing.assert_close(captured[name], t)
    return inter


def _check_backward(model: nn.Module, x: torch.Tensor) -> None:
    """A train-mode forward/backward reaches every parameter."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert out.shape == (x.shape[0], model.num_classes)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _run_contract(name: str, in_chans: int, size: int, num_classes: int = 7,
                  **kwargs) -> tuple[nn.Module, list[torch.Tensor]]:
    """Build ``name`` and run the contract on 2 images of shape (in_chans, size, size)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    assert (model.num_classes, model.in_chans) == (num_classes, in_chans)
    x = torch.randn(2, in_chans, size, size)
    inter = _check_feature_api(model, x)
    _check_backward(model, x)
    return model, inter


@pytest.fixture
def run_contract() -> Callable[..., tuple[nn.Module, list[torch.Tensor]]]:
    """Contract checker: run_contract(name, in_chans, size, **kwargs) -> (model, stages)."""
    return _run_contract
