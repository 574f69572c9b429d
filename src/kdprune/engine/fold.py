"""Convs whose forward transforms their weight (weight standardisation, weight norm, scaled convs):
folded into the plain conv they compute before their channels are cut.

Removing input channels of a weight-standardised conv changes the mean and variance its forward
normalises each filter with, so the pruned conv would compute another function. The transform
depends on the weight only, so the conv the forward actually runs (its effective weight) is read
once, checked to reproduce the module's output, and written back while the module becomes its
plain base class (same object, so DepGraph's references hold). Pruning the plain conv is then exact.
The fold is part of the ``prune_channels`` edit, so replaying the structure log on load folds the
same layers. What it costs: fine-tuning after pruning trains the plain conv (no re-standardisation).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["transforms_weight", "fold_weight_transform"]

_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CALLS = frozenset({F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.linear})


def transforms_weight(module: nn.Module) -> bool:
    """A conv/linear subclass with a forward of its own (it may transform its weight)."""
    base = _plain_base(module)
    return (base is not None and type(module) is not base and type(module).forward is not base.forward
            and not getattr(module, "kdprune_no_fold", False))


def _plain_base(module: nn.Module) -> type | None:
    return next((c for c in type(module).__mro__ if c in _PLAIN), None)


class _Capture(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.weight: torch.Tensor | None = None
        self.bias: Any = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CALLS and self.weight is None:
            self.weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self.bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return func(*args, **kwargs)


def _probe(module: nn.Module, base: type) -> torch.Tensor:
    w = module.weight
    g = torch.Generator(device="cpu").manual_seed(0)
    if base is nn.Linear:
        shape = (2, w.shape[1])
    else:
        size = [max(8, 2 * k) for k in w.shape[2:]]
        shape = (2, w.shape[1] * getattr(module, "groups", 1), *size)
    return torch.randn(shape, generator=g).to(w.device, w.dtype)


@torch.no_grad()
def fold_weight_transform(module: nn.Module) -> bool:
    """Turn ``module`` in place into its plain base class holding the weight its forward used;
    False (nothing changed) when its forward is not a weight-only transform of a plain conv."""
    base = _plain_base(module)
    if base is None or not transforms_weight(module):
        return False
    x = _probe(module, base)
    mode = _Capture()
    with mode:
        want = module(x)
    if mode.weight is None or mode.weight.shape != module.weight.shape:
        return False
    weight, bias = mode.weight.detach().clone(), mode.bias
    if isinstance(bias, torch.Tensor) and module.bias is None:
        return False  # a bias the plain module has no slot for
    got = base.forward(_as_plain(module, base, weight, bias, apply=False), x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return False
    _as_plain(module, base, weight, bias, apply=True)
    return True


def _as_plain(module: nn.Module, base: type, weight: torch.Tensor, bias: Any, apply: bool) -> nn.Module:
    """The module as a plain ``base`` with these weights (a copy unless ``apply``)."""
    if not apply:
        module = copy.deepcopy(module)
    module.__class__ = base
    module.weight.data = weight.to(module.weight.dtype)
    if isinstance(bias, torch.Tensor) and module.bias is not None:
        module.bias.data = bias.detach().clone().to(module.bias.dtype)
    return module
