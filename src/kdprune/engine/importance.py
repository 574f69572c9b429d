"""Channel importance criteria: the typed choices ``L1()``, ``L2()``, ``BNScale()``, ``Taylor()``,
``Random()`` (frozen dataclasses; ``IMPORTANCE`` maps their YAML/CLI names to the types).

A criterion is any ``fn(model, group, seed=...) -> Tensor[group.channels]`` in root channel order
(higher = more important); the built-in ones are such callables. Per-layer scores are computed
for each coupled producer (a layer whose output channels are removed) and averaged over the
producers that hold each root channel.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from kdprune.engine.graph import ChannelGroup, Member
from kdprune.registry import Registry, choice, choice_name

__all__ = ["IMPORTANCE", "Criterion", "importance_scores", "l1", "l2", "bn_scale", "taylor",
           "random_importance", "L1", "L2", "BNScale", "Taylor", "Random", "criterion_label"]

Criterion = Callable[..., torch.Tensor]
#: YAML/CLI name -> criterion type (names are read only at the config boundary).
IMPORTANCE: Registry[type] = Registry("importance")

_WEIGHTED = ("conv", "dwconv", "gconv", "linear")


def _out_rows(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Weight reshaped to [out_channels, -1] (transposed convs keep out channels in dim 1)."""
    if getattr(module, "transposed", False):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


def _aggregate(group: ChannelGroup, per_member: list[tuple[Member, torch.Tensor]]) -> torch.Tensor:
    """Mean over members of their per-local-channel scores, mapped to root order."""
    total = torch.zeros(group.channels, dtype=torch.float64)
    count = torch.zeros(group.channels, dtype=torch.float64)
    for member, local in per_member:
        local = local.detach().double().cpu()
        idx, root = torch.tensor(member.idxs), torch.tensor(member.root_idxs)
        total.index_add_(0, root, local[idx])
        count.index_add_(0, root, torch.ones(len(root), dtype=torch.float64))
    if (count == 0).any():
        raise ValueError(f"group {group.root!r}: no scored layer covers every channel")
    return (total / count).float()


def _weighted(model: nn.Module, group: ChannelGroup) -> list[tuple[Member, nn.Module]]:
    found = [(m, model.get_submodule(m.name)) for m in group.producers if m.kind in _WEIGHTED]
    if not found:
        raise ValueError(f"group {group.root!r} has no conv/linear producer to score")
    return found


def l1(model: nn.Module, group: ChannelGroup, **_: object) -> torch.Tensor:
    """L1 norm of each output filter (PFEC, Li et al. 2017), averaged over coupled layers."""
    return _aggregate(group, [(m, _out_rows(mod.weight, mod).abs().sum(1))
                              for m, mod in _weighted(model, group)])


def l2(model: nn.Module, group: ChannelGroup, **_: object) -> torch.Tensor:
    """L2 norm of each output filter (PFEC-style, Li et al. 2017), averaged over coupled layers."""
    return _aggregate(group, [(m, _out_rows(mod.weight, mod).norm(dim=1))
                              for m, mod in _weighted(model, group)])


def bn_scale(model: nn.Module, group: ChannelGroup, **_: object) -> torch.Tensor:
    """|gamma| of the BatchNorms in the group (Network Slimming, Liu et al. 2017)."""
    bns = [(m, model.get_submodule(m.name)) for m in group.producers if m.kind == "bn"]
    bns = [(m, b) for m, b in bns if getattr(b, "weight", None) is not None]
    if not bns:
        raise ValueError(f"bn_scale: group {group.root!r} has no affine BatchNorm; add its root to "
                         "ignored_layers or pass scores= for it")
    return _aggregate(group, [(m, b.weight.abs()) for m, b in bns])


def _taylor_member(member: Member, module: nn.Module) -> torch.Tensor:
    """sum over one channel's parameters of |w * dL/dw| (weight and bias)."""
    score = None
    for p in (module.weight, getattr(module, "bias", None)):
        if p is None:
            continue
        if p.grad is None:
            raise ValueError(f"taylor importance needs gradients: {member.name} has no .grad; run "
                             "loss.backward() before scoring")
        rows = _out_rows(p * p.grad, module) if p.dim() > 1 else (p * p.grad).reshape(-1, 1)
        s = rows.abs().sum(1)
        score = s if score is None else score + s
    return score


def taylor(model: nn.Module, group: ChannelGroup, **_: object) -> torch.Tensor:
    """First-order Taylor |w * dL/dw| summed per channel (Molchanov et al. 2019), averaged over
    the coupled conv/linear/BN layers; gradients must already be in ``.grad``."""
    members = [(m, model.get_submodule(m.name)) for m in group.producers
               if m.kind in _WEIGHTED + ("bn",)]
    members = [(m, mod) for m, mod in members if getattr(mod, "weight", None) is not None]
    return _aggregate(group, [(m, _taylor_member(m, mod)) for m, mod in members])


def random_importance(model: nn.Module, group: ChannelGroup, seed: int = 0, **_: object) -> torch.Tensor:
    """Uniform random scores, seeded per (seed, group root) so they are reproducible."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(group.root.encode()))
    return torch.rand(group.channels, generator=gen)


@choice("l1", IMPORTANCE)
@dataclass(frozen=True)
class L1:
    """L1 norm of each output filter (PFEC, Li et al. 2017)."""

    def __call__(self, model: nn.Module, group: ChannelGroup, **kw: object) -> torch.Tensor:
        """Scores of ``group``'s channels."""
        return l1(model, group, **kw)


@choice("l2", IMPORTANCE)
@dataclass(frozen=True)
class L2:
    """L2 norm of each output filter (PFEC-style, Li et al. 2017)."""

    def __call__(self, model: nn.Module, group: ChannelGroup, **kw: object) -> torch.Tensor:
        """Scores of ``group``'s channels."""
        return l2(model, group, **kw)


@choice("bn_scale", IMPORTANCE)
@dataclass(frozen=True)
class BNScale:
    """|gamma| of the group's BatchNorms (Network Slimming, Liu et al. 2017)."""

    def __call__(self, model: nn.Module, group: ChannelGroup, **kw: object) -> torch.Tensor:
        """Scores of ``group``'s channels."""
        return bn_scale(model, group, **kw)


@choice("taylor", IMPORTANCE)
@dataclass(frozen=True)
class Taylor:
    """First-order Taylor |w * dL/dw| (Molchanov et al. 2019); needs ``.grad`` filled."""

    def __call__(self, model: nn.Module, group: ChannelGroup, **kw: object) -> torch.Tensor:
        """Scores of ``group``'s channels."""
        return taylor(model, group, **kw)


@choice("random", IMPORTANCE)
@dataclass(frozen=True)
class Random:
    """Uniform random scores, reproducible per (seed, group root)."""

    def __call__(self, model: nn.Module, group: ChannelGroup, seed: int = 0, **kw: object) -> torch.Tensor:
        """Scores of ``group``'s channels."""
        return random_importance(model, group, seed=seed, **kw)


def criterion_label(criterion: Criterion) -> str:
    """A criterion's name for reports: its YAML/CLI name, else the callable's __name__."""
    return choice_name(criterion) or getattr(criterion, "__name__", "custom")


def importance_scores(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    criterion: Criterion = L1(),
    scores: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-channel scores for every group: ``criterion`` (``L1()``... or any callable), with
    entries of ``scores`` (group root -> tensor) overriding it for their groups."""
    if not callable(criterion):
        names = ", ".join(f"{IMPORTANCE.get(n).__name__}()" for n in IMPORTANCE)
        raise TypeError(f"criterion must be a callable such as {names}, got {criterion!r} (names are "
                        "read from YAML/CLI only: kdprune.engine.IMPORTANCE.get(name)())")
    overrides = dict(scores or {})
    known = {g.root for g in groups}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"scores given for unknown group roots {unknown}; known: {sorted(known)}")
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for g in groups:
            s = overrides[g.root] if g.root in overrides else criterion(model, g, seed=seed)
            s = torch.as_tensor(s).detach().flatten().float().cpu()
            if s.numel() != g.channels:
                raise ValueError(f"scores for {g.root!r} have {s.numel()} entries, expected {g.channels}")
            out[g.root] = s
    return out
