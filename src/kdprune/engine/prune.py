"""Physical channel removal with torch-pruning (DepGraph, Fang et al. 2023): every coupled layer of
a group (BN, next conv's input, residual partners, concat consumers, depthwise convs) shrinks
together, and each removal is recorded in the model's structure log."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_pruning as tp
from torch import nn

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.graph import _member_kind, _member_name, _members, build_graph, tie_classes, tp_group
from kdprune.engine.structure import record_edit, register_edit

__all__ = ["apply_plan", "apply_channel_edits", "prune_channels_edit", "MaskedModelError"]


class MaskedModelError(RuntimeError):
    """Raised when physically pruning a model that still has soft masks attached."""


def prune_channels_edit(root: str, idxs: Sequence[int]) -> dict[str, Any]:
    """The structure-log edit for removing output channels ``idxs`` of group root ``root``."""
    return {"op": "prune_channels", "root": root, "dim": "out", "idxs": sorted(int(i) for i in idxs)}


def _root_module(model: nn.Module, root: str) -> nn.Module:
    try:
        return model.get_submodule(root)
    except AttributeError:
        raise ValueError(f"prune_channels: root module {root!r} not found in the model") from None


def _check_idxs(dg: tp.DependencyGraph, module: nn.Module, root: str, idxs: Sequence[int]) -> int:
    if module not in dg.module2node:
        raise ValueError(f"prune_channels: root {root!r} is not on the traced graph")
    n = dg.get_pruner_of_module(module).get_out_channels(module)
    if n is None:
        raise ValueError(f"prune_channels: {root!r} ({type(module).__name__}) has no output channels")
    bad = [i for i in idxs if not 0 <= i < n]
    if bad:
        raise ValueError(f"prune_channels: idxs {bad[:5]} out of range for {root!r} with {n} channels")
    if len(set(idxs)) >= n:
        raise ValueError(f"prune_channels: cannot remove all {n} channels of {root!r}")
    return n


def _check_not_emptied(dg: tp.DependencyGraph, item, root: str) -> None:
    target = item.dep.target
    if not isinstance(target.module, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
        return
    width = dg.get_pruner_of_module(target.module).get_out_channels(target.module)
    if width is not None and len(set(item.idxs)) >= width:
        raise ValueError(f"prune_channels: pruning {root!r} would remove all {width} channels of "
                         f"{_member_name(dg, target)}")


def _check_ties(dg: tp.DependencyGraph, model: nn.Module, root: str, idxs: Sequence[int]) -> None:
    """Grouped convs keep their ``groups``: the removed channels must be whole tie classes (the
    same in-group position from every conv group), or the pruned model would compute another
    function."""
    members = _members(dg, tp_group(dg, model, root))
    if not any(m.kind == "gconv" for m in members):
        return
    try:
        ties = tie_classes(model, members)
    except ValueError as e:
        raise ValueError(f"prune_channels: group of {root!r} cannot be pruned: {e}") from None
    chosen = set(idxs)
    split = [c for c in ties if 0 < len(chosen & set(c)) < len(c)]
    if split:
        raise ValueError(f"prune_channels: idxs of {root!r} split the grouped-conv tie class {list(split[0])}: "
                         "remove the same position from every conv group (see ChannelGroup.ties)")


def _prune_one(dg: tp.DependencyGraph, model: nn.Module, edit: dict[str, Any], done: set | None) -> None:
    if edit.get("dim", "out") != "out":
        raise ValueError(f"prune_channels: only dim='out' is supported, got {edit.get('dim')!r}")
    root, idxs = edit["root"], [int(i) for i in edit["idxs"]]
    module = _root_module(model, root)
    _check_idxs(dg, module, root, idxs)
    if not idxs:
        return
    _check_ties(dg, model, root, idxs)
    group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs)
    touched = set()
    for item in group.items:
        kind = _member_kind(dg, item.dep.target)
        if kind == "barrier":
            raise ValueError(f"prune_channels: group of {root!r} flows through a channel barrier "
                             f"({_member_name(dg, item.dep.target)}); it cannot be pruned")
        if dg.is_out_channel_pruning_fn(item.dep.handler):
            touched.add(item.dep.target.module)
            _check_not_emptied(dg, item, root)
    if done is not None and module in done:
        raise ValueError(f"prune_channels: group of {root!r} was already pruned in this plan "
                         "(two roots of one coupled group)")
    group.prune()
    if done is not None:
        done |= touched


def apply_channel_edits(model: nn.Module, edits: Sequence[dict[str, Any]],
                        example_input: torch.Tensor | None, one_plan: bool = False) -> None:
    """Apply prune_channels edits in order on one DepGraph (no logging; used by replay). With
    ``one_plan`` the edits must hit distinct groups (indices all refer to the unpruned numbering);
    otherwise later edits may re-prune a group in its already-renumbered channels."""
    if not edits:
        return
    if example_input is None:
        raise ValueError("prune_channels needs an example input (the structure log has no input_shape)")
    if getattr(model, "kdprune_masks", None) is not None:
        raise MaskedModelError("model has soft masks attached: fold_gates_into_bn / MaskSet.remove() "
                               "them before physical pruning")
    dg = build_graph(model, example_input)
    done: set | None = set() if one_plan else None
    for edit in edits:
        _prune_one(dg, model, edit, done)


def apply_plan(model: nn.Module, example_input: torch.Tensor, plan: PruningPlan) -> None:
    """Physically remove the planned channels in place (DepGraph, Fang et al. 2023) and record
    one ``prune_channels`` edit per group in ``model.kdprune_structure``."""
    edits = [prune_channels_edit(root, idxs) for root, idxs in plan.items() if idxs]
    apply_channel_edits(model, edits, example_input, one_plan=True)
    for edit in edits:
        record_edit(model, edit, example_input)


@register_edit("prune_channels")
class PruneChannels:
    """Remove output channels of a group root and all coupled layers (torch-pruning)."""

    @staticmethod
    def apply(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None) -> None:
        """Apply one prune_channels edit (builds its own DepGraph)."""
        apply_channel_edits(model, [edit], example_input)

    @staticmethod
    def apply_many(model: nn.Module, edits: Sequence[dict[str, Any]], example_input: torch.Tensor | None) -> None:
        """Apply consecutive prune_channels edits on one DepGraph (replay)."""
        apply_channel_edits(model, edits, example_input)
