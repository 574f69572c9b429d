"""Physical channel removal with torch-pruning (DepGraph, Fang et al. 2023): every coupled layer of
a group (BN, next conv's input, residual partners, concat consumers, depthwise convs) shrinks
together, and each removal is recorded in the model's structure log."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.fold import fold_weight_transform
from kdprune.engine.graph import (ChannelGroup, _member_kind, _member_name, _members, build_graph, stand_in_root,
                                  tp_group)
from kdprune.engine.links import is_multiplier, link_ties, raw_group_table
from kdprune.engine.reshape import ChannelReshape
from kdprune.engine.slices import ChannelSlice
from kdprune.engine.structure import record_edit, register_edit

__all__ = ["apply_plan", "apply_channel_edits", "prune_channels_edit", "MaskedModelError"]


class MaskedModelError(RuntimeError):
    """Raised when physically pruning a model that still has soft masks attached."""


def prune_channels_edit(root: str, idxs: Sequence[int], group: ChannelGroup | None = None) -> dict[str, Any]:
    """The structure-log edit for removing channels ``idxs`` of group ``root``; for a linked group
    (``group.parts``), the first part's channels plus a ``linked`` list with each other part's."""
    if group is None or not group.parts:
        return {"op": "prune_channels", "root": root, "dim": "out", "idxs": sorted(int(i) for i in idxs)}
    chosen = {int(i) for i in idxs}
    split = [c for c in group.ties if 0 < len(chosen & set(c)) < len(c)]
    if split:
        raise ValueError(f"prune_channels: idxs of {root!r} split the tie class {list(split[0])}: remove whole "
                         "classes (see ChannelGroup.ties)")
    parts = [(p.root, [i for i, c in enumerate(p.map) if c in chosen]) for p in group.parts]
    edit = {"op": "prune_channels", "root": parts[0][0], "dim": "out", "idxs": parts[0][1]}
    edit["linked"] = [{"root": r, "idxs": ids} for r, ids in parts[1:] if ids]
    return edit


def _root_module(model: nn.Module, root: str) -> nn.Module:
    try:
        return model.get_submodule(root)
    except AttributeError:
        raise ValueError(f"prune_channels: root module {root!r} not found in the model") from None


def _check_idxs(dg: tp.DependencyGraph, module: nn.Module, root: str, idxs: Sequence[int]) -> int:
    if module not in dg.module2node:
        raise ValueError(f"prune_channels: root {root!r} is not on the traced graph")
    n = dg.get_pruner_of_module(module).get_out_channels(module)
    if isinstance(module, ChannelReshape):
        n = module.call.after[1]  # a shuffle's output (a linked part): the channels it produces
    elif isinstance(module, ChannelSlice):
        n = module.bounds[1] - module.bounds[0]
    if n is None:
        raise ValueError(f"prune_channels: {root!r} ({type(module).__name__}) has no output channels")
    bad = [i for i in idxs if not 0 <= i < n]
    if bad:
        raise ValueError(f"prune_channels: idxs {bad[:5]} out of range for {root!r} with {n} channels")
    if len(set(idxs)) >= n and not isinstance(module, ChannelSlice):  # a slice piece may go whole
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
        ties = link_ties(model, members)
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
    linked = "linked" in edit  # a linked group's edit, even when only its first part loses channels
    parts = [(edit["root"], [int(i) for i in edit["idxs"]])]
    parts += [(p["root"], [int(i) for i in p["idxs"]]) for p in edit.get("linked", ())]
    groups = []
    for root, idxs in parts:  # check every part before pruning any
        module = stand_in_root(dg, root) or _root_module(model, root)
        _check_idxs(dg, module, root, idxs)
        if idxs and not linked:
            _check_ties(dg, model, root, idxs)
        if idxs:
            groups.append(_checked_group(dg, module, root, idxs, linked))
    for module, _, _ in groups:
        if done is not None and module in done:
            raise ValueError(f"prune_channels: group of {_member_name(dg, dg.module2node[module])!r} was already "
                             "pruned in this plan (two roots of one coupled group)")
    for _, group, _ in groups:  # weight-standardised convs & co.: cut the conv their forward runs
        for item in group.items:
            fold_weight_transform(item.dep.target.module)
    if linked:
        _prune_linked(dg, model, [g for _, g, _ in groups])
    else:
        for _, group, _ in groups:
            group.prune()
    if done is not None:
        for _, _, touched in groups:
            done |= touched


def _checked_group(dg: tp.DependencyGraph, module: nn.Module, root: str, idxs: list[int], linked: bool):
    """(root module, tp group, modules whose outputs shrink), refusing barriers and emptied layers."""
    group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, idxs)
    touched = set()
    for item in group.items:
        kind = _member_kind(dg, item.dep.target)
        if kind == "barrier" and not (linked and isinstance(item.dep.target.module, (ChannelReshape, ChannelSlice))):
            raise ValueError(f"prune_channels: group of {root!r} flows through a channel barrier "
                             f"({_member_name(dg, item.dep.target)}); it cannot be pruned")
        if dg.is_out_channel_pruning_fn(item.dep.handler):
            touched.add(item.dep.target.module)
            _check_not_emptied(dg, item, root)
    return module, group, touched


def _prune_linked(dg: tp.DependencyGraph, model: nn.Module, groups: list) -> None:
    """Prune the parts of a linked group at once: a layer several parts reach (a grouped conv
    reading two of them) is cut once with all its channels, so each conv group loses the same
    positions; a channel multiplier's inputs drop whole conv groups (``groups`` shrinks)."""
    multipliers = {m for m in model.modules() if is_multiplier(m)}  # before any cut of this edit
    cuts: dict[tuple, tuple] = {}
    for group in groups:
        for item in group.items:
            if item.dep.target.type == ops.OPTYPE.PARAMETER:
                raise ValueError("prune_channels: a linked group cannot prune a bare nn.Parameter "
                                 f"({_member_name(dg, item.dep.target)})")
            key = (id(item.dep.target.module), item.dep.handler)
            cuts.setdefault(key, (item.dep, set()))[1].update(int(getattr(i, "idx", i)) for i in item.idxs)
    for dep, idxs in cuts.values():
        mod = dep.target.module
        if mod in multipliers and not dg.is_out_channel_pruning_fn(dep.handler):
            mod.in_channels -= len(idxs)  # its output rows go with the linked part that holds them
            mod.groups -= len(idxs)
        else:
            dep(sorted(idxs))


def apply_channel_edits(model: nn.Module, edits: Sequence[dict[str, Any]],
                        example_input: torch.Tensor | None, one_plan: bool = False) -> None:
    """Apply prune_channels edits in order on one DepGraph (no logging; used by replay). With
    ``one_plan`` the edits must hit distinct groups (indices all refer to the unpruned numbering);
    otherwise later edits may re-prune a group in its already-renumbered channels."""
    if not edits:
        return
    if example_input is None:
        raise ValueError("prune_channels needs an example input (the structure log has no input_shape)")
    _check_unmasked(model)
    _apply_edits(model, build_graph(model, example_input), edits, one_plan)


def _apply_edits(model: nn.Module, dg: tp.DependencyGraph | None, edits: Sequence[dict[str, Any]],
                 one_plan: bool) -> None:
    done: set | None = set() if one_plan else None
    for edit in edits:
        _prune_one(dg, model, edit, done)


def apply_plan(model: nn.Module, example_input: torch.Tensor, plan: PruningPlan,
               groups: Sequence[ChannelGroup] | None = None) -> None:
    """Physically remove the planned channels in place (DepGraph, Fang et al. 2023) and record
    one ``prune_channels`` edit per group in ``model.kdprune_structure``. ``groups``: the channel
    groups the plan was made on (this model's, or an unedited copy's), so that linked groups are
    not traced again (budget searches apply many plans to copies of one model)."""
    plan_items = [(root, idxs) for root, idxs in plan.items() if idxs]
    _check_unmasked(model)
    dg = build_graph(model, example_input) if plan_items else None
    if groups is not None:
        linked = {g.root: g for g in groups if g.parts}
    else:
        linked = _linked_groups(model, example_input, dg) if plan_items else {}
    edits = [prune_channels_edit(root, idxs, linked.get(root)) for root, idxs in plan_items]
    _apply_edits(model, dg, edits, one_plan=True)
    for edit in edits:
        record_edit(model, edit, example_input)


def _check_unmasked(model: nn.Module) -> None:
    if getattr(model, "kdprune_masks", None) is not None:
        raise MaskedModelError("model has soft masks attached: fold_gates_into_bn / MaskSet.remove() "
                               "them before physical pruning")


def _may_link(m: nn.Module) -> bool:
    """A grouped conv other than a plain depthwise one (those never link groups)."""
    return (isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
            and not m.groups == m.in_channels == m.out_channels)


def _linked_groups(model: nn.Module, x: torch.Tensor, dg: tp.DependencyGraph) -> dict[str, ChannelGroup]:
    """Root -> linked group (those with parts); skipped on models with nothing to link."""
    if not getattr(dg, "kdprune_stand_ins", ()) and not any(map(_may_link, model.modules())):
        return {}
    return {s.group.root: s.group for s in raw_group_table(model, x, dg=dg) if s.group.parts and s.blocker is None}


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
