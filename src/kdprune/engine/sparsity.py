"""Group-lasso sparsity over coupled channel groups (the DepGraph group-norm regulariser)."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from kdprune.engine.graph import ChannelGroup

_OUT_KINDS = ("conv", "dwconv", "gconv", "linear", "bn")
_IN_KINDS = ("conv", "linear")  # a consumer's input slice belongs to the group too


def _slices(model: nn.Module, group: ChannelGroup) -> Iterator[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]:
    """(parameter, dim, local channel idxs, root channel idxs) for every tensor slice in the group."""
    for m in group.members:
        if m.role == "out" and m.kind in _OUT_KINDS:
            mod = model.get_submodule(m.name)
            dim = 1 if getattr(mod, "transposed", False) else 0
            params = [(mod.weight, dim)] + ([(mod.bias, 0)] if getattr(mod, "bias", None) is not None else [])
        elif m.role == "in" and m.kind in _IN_KINDS:
            mod = model.get_submodule(m.name)
            if getattr(mod, "groups", 1) != 1:
                continue
            params = [(mod.weight, 0 if getattr(mod, "transposed", False) else 1)]
        else:
            continue
        for p, d in params:
            if p is not None and p.requires_grad:
                yield p, d, torch.tensor(m.idxs, device=p.device), torch.tensor(m.root_idxs, device=p.device)


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares of `t` over every dim but `dim`: [channels]."""
    return t.pow(2).transpose(0, dim).reshape(t.shape[dim], -1).sum(1)


def group_norms(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Per-channel L2 norm of all the group's coupled parameters: [group.channels]."""
    sq = None
    for p, dim, local, root in _slices(model, group):
        part = _per_channel(p.detach().index_select(dim, local), dim).float()
        sq = torch.zeros(group.channels, device=p.device).index_add_(0, root, part) if sq is None \
            else sq.index_add_(0, root, part)
    if sq is None:
        raise ValueError(f"group {group.root!r} has no trainable parameters")
    return sq.sqrt()


def group_lasso_penalty(model: nn.Module, groups: Sequence[ChannelGroup], reg: float) -> torch.Tensor:
    """reg * sum over groups and channels of the channel's coupled L2 norm (differentiable)."""
    total = 0.0
    for g in groups:
        sq = None
        for p, dim, local, root in _slices(model, g):
            part = _per_channel(p.index_select(dim, local), dim)
            sq = torch.zeros(g.channels, device=p.device, dtype=part.dtype).index_add(0, root, part) \
                if sq is None else sq.index_add(0, root, part)
        if sq is not None:
            total = total + sq.clamp_min(1e-12).sqrt().sum()
    return reg * total


@torch.no_grad()
def add_group_lasso_grad_(model: nn.Module, groups: Sequence[ChannelGroup], reg: float) -> None:
    """Add the group-lasso (sub)gradient reg * w / ||w_c|| to each parameter's .grad, in place."""
    for g in groups:
        norm = group_norms(model, g).clamp_min(1e-12)  # [channels]
        for p, dim, local, root in _slices(model, g):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            scale = (reg / norm[root]).to(p.dtype)  # [len(local)]
            shape = [1] * p.dim()
            shape[dim] = -1
            p.grad.index_add_(dim, local, p.index_select(dim, local) * scale.view(shape))
