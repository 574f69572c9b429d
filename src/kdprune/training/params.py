"""Optimizer parameter groups: which parameters SGD updates and which of them get weight decay.

By default weight decay only hits conv/linear weights (parameters with more than one dimension).
BatchNorm affine parameters, biases and per-channel gates or scalar masks are 1-D or 0-D: decaying
them shrinks the very scales that gates and BN-based pruning read, and is not what the reference
CIFAR recipes mean by L2 on the weights. A model may also list parameter names that must not be
decayed with a ``no_weight_decay()`` method (timm's convention). Parameters a callback or task
*owns* (updated by itself, e.g. a FISTA step on block masks) are kept out of the optimizer.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

__all__ = ["param_groups", "no_decay_names"]


def no_decay_names(module: nn.Module) -> set[str]:
    """Names the module asks to keep free of weight decay (``no_weight_decay()``, if defined)."""
    fn = getattr(module, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def _named_trainable(modules: dict[str, nn.Module]) -> list[tuple[str, str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for prefix, mod in modules.items():
        for name, p in mod.named_parameters():
            if p.requires_grad and id(p) not in seen:  # shared weights enter once
                seen.add(id(p))
                out.append((prefix, name, p))
    return out


def param_groups(modules: dict[str, nn.Module], owned: Iterable[nn.Parameter] = (),
                 decay_1d: bool = False) -> list[dict]:
    """Split the trainable parameters of ``modules`` into a decayed and a not-decayed group.

    ``decay_1d=True`` puts every parameter in the decayed group (one group, the plain-PyTorch
    behaviour). ``owned`` parameters are left out of both groups. Empty groups are dropped."""
    owned_ids = {id(p) for p in owned}
    skip = {prefix: no_decay_names(mod) for prefix, mod in modules.items()}
    decay, no_decay = [], []
    for prefix, name, p in _named_trainable(modules):
        if id(p) in owned_ids:
            continue
        if decay_1d or (p.ndim > 1 and name not in skip[prefix]):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
