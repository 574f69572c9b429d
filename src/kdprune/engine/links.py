"""Channel groups, with DepGraph groups linked where a construct couples them in a way DepGraph
cannot express (Fang et al. 2023 couple channels one-to-one; these are not):

- a **channel shuffle** (``view -> transpose -> reshape``, see ``engine.reshape``): the groups on
  its two sides are one group whose channels are matched through the shuffle's permutation; the
  same in-block position goes from every shuffle block, so the pruned shuffle still shuffles;
- a **channel multiplier** (a conv with ``groups == in_channels`` and ``out = k * in``): dropping
  input channel i drops its whole conv group, so the group of its inputs and the group of its
  outputs are one, each input channel tied to its k output channels (``groups`` shrinks);
- a **grouped conv reading several DepGraph groups** (e.g. the concat of a pooled shortcut and a
  branch, read by a grouped 1x1): the groups are one, so that every conv group loses the same
  in-group positions.

A linked group is one ``ChannelGroup`` with ``parts``: the DepGraph groups it is made of, each
with the group channel of each of its root channels (many to one for a multiplier). Plans,
importance, masks and budgets work on it as on any group; ``apply_plan`` removes each part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from kdprune.engine.reshape import ChannelReshape
from kdprune.engine.slices import ChannelSlice
from kdprune.engine.graph import (
    _UNPRUNABLE, RESHAPE_ROOT, ChannelGroup, Member, Part, _gconv_period, _member_name, _members, _sites,
    build_graph, classifier_layers, invalid_member, resolve_layers,
)

__all__ = ["raw_group_table", "GroupStatus", "is_multiplier", "link_ties"]


def is_multiplier(module: nn.Module) -> bool:
    """A conv whose every input channel is its own conv group and that widens (``out = k * in``,
    k > 1): a depthwise conv with a channel multiplier."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels and module.out_channels % module.in_channels == 0
            and module.out_channels > module.in_channels)


@dataclass(frozen=True)
class _Raw:
    """One DepGraph group: its root, members, sites and why it is excluded (ignored/classifier)."""

    root: str
    order: int
    members: tuple[Member, ...]
    sites: tuple[str, ...]
    excluded: str | None

    width: int  # the root's channels (a shuffle-output part may hold only some of them)

    @property
    def ids(self) -> list[int]:
        """The root channels in this group."""
        return sorted(set(self.members[0].root_idxs))


@dataclass(frozen=True)
class GroupStatus:
    """A (possibly linked) group and why it cannot be pruned (None: it can)."""

    group: ChannelGroup
    blocker: str | None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


def _raw_groups(model: nn.Module, dg: tp.DependencyGraph, excluded: dict[nn.Module, tuple[str, str]],
                root_types: tuple[type, ...]) -> list[_Raw]:
    """DepGraph's groups in module order; ``excluded``: module -> (name, why it is never pruned)."""
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    out = []
    for group in dg.get_all_groups(ignored_layers=[], root_module_types=root_types):
        members = _members(dg, group)
        root = group[0].dep.target.module
        why = None
        for item in group.items:
            mod = item.dep.target.module
            if dg.is_out_channel_pruning_fn(item.dep.handler) and mod in excluded:
                name, reason = excluded[mod]
                why = reason if mod is root else f"coupled to {name} ({reason})"
                break
        out.append(_Raw(dg._module2name[root], order.get(root, len(order)), members,
                        _sites(dg, model, members), why, len(members[0].idxs)))
    out += _stand_in_outputs(model, dg, out, len(order))
    return sorted(out, key=lambda r: r.order)


def _stand_in_outputs(model: nn.Module, dg: tp.DependencyGraph, found: Sequence[_Raw], last: int) -> list[_Raw]:
    """Groups rooted at a shuffle's output or a channel slice's piece where no layer's output group
    reaches it (it feeds a plain conv or a split directly), so that the link can join it."""
    stand_ins = getattr(dg, "kdprune_stand_ins", ())
    outputs = [(s.first + 1, len(s.perm)) for _, _, s in getattr(dg, "kdprune_shuffles", ())]
    outputs += [(k, m.call.pieces[m.piece][1] - m.call.pieces[m.piece][0]) for k, m in enumerate(stand_ins)
                if isinstance(m, ChannelSlice) and m in dg.module2node]
    outputs += [(k, m.call.after[1]) for k, m in enumerate(stand_ins)
                if isinstance(m, ChannelReshape) and m.call.op in _EXITS and m in dg.module2node]
    out = []
    for k, c in outputs:
        stand_in = stand_ins[k]
        owned = _channel_owners(list(found) + out, dg._module2name[stand_in], "out")
        free = sorted(set(range(c)) - set(owned))
        if not free or not c:
            continue
        group = dg.get_pruning_group(stand_in, dg.get_pruner_of_module(stand_in).prune_out_channels, free)
        members = _members(dg, group)
        out.append(_Raw(f"{RESHAPE_ROOT}{k}", last + k, members, _sites(dg, model, members), None, c))
    return out


def _locate(raws: Sequence[_Raw], name: str, role: str) -> list[tuple[int, Member]]:
    return [(i, m) for i, r in enumerate(raws) for m in r.members if m.name == name and m.role == role]


def _channel_owners(raws: Sequence[_Raw], name: str, role: str) -> dict[int, tuple[int, int]]:
    """Layer channel -> (group index, root channel) over every group holding ``name`` on ``role``."""
    return {l: (g, r) for g, m in _locate(raws, name, role) for l, r in zip(m.idxs, m.root_idxs)}


def _even_splits(dg: tp.DependencyGraph, stand_in: nn.Module, c: int) -> list[tuple[str, int]]:
    """(member name, chunk size) of each equal channel split fed straight by this shuffle output."""
    found = []
    for node in dg.module2node[stand_in].outputs:
        offsets = getattr(node.module, "offsets", None) if node.type == ops.OPTYPE.SPLIT else None
        if offsets and offsets[0] == 0 and offsets[-1] == c and len(offsets) > 2:
            sizes = {b - a for a, b in zip(offsets, offsets[1:])}
            if len(sizes) == 1:
                found.append((_member_name(dg, node), sizes.pop()))
    return found


class _Links:
    """What joins DepGraph groups: channel unions over (group index, root channel), group unions,
    tie sets (channels that must go together) and the stand-ins/splits the links resolve."""

    def __init__(self) -> None:
        self.chans, self.comps, self.ties, self.resolved = _UnionFind(), _UnionFind(), [], set()

    def join(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        """Channels ``a`` and ``b`` ((group index, root channel)) are one, so their groups are one."""
        self.chans.union(a, b)
        self.comps.union(a[0], b[0])


def _link(raws: Sequence[_Raw], model: nn.Module, dg: tp.DependencyGraph) -> _Links:
    """Every link of the graph: shuffles, channel multipliers, grouped convs over several groups."""
    links = _Links()
    for v_name, r_name, shuffle in getattr(dg, "kdprune_shuffles", ()):
        _link_shuffle(links, raws, dg, v_name, r_name, shuffle)
    _link_slices(links, raws, dg)
    _link_stacks(links, raws, dg)
    for name, mod in model.named_modules():
        if is_multiplier(mod):
            _link_multiplier(links, raws, name, mod)
    for i, r in enumerate(raws):  # a grouped conv reading several groups joins them
        for m in r.members:
            if m.kind == "gconv" and m.role == "in" and not is_multiplier(model.get_submodule(m.name)):
                for j, _ in _locate(raws, m.name, "in"):
                    links.comps.union(i, j)
    return links


def _link_shuffle(links: _Links, raws: Sequence[_Raw], dg: tp.DependencyGraph, v_name: str, r_name: str,
                  shuffle) -> None:
    """Match the shuffle's input and output channels; tie each in-block position across blocks."""
    v_in, r_out = _channel_owners(raws, v_name, "in"), _channel_owners(raws, r_name, "out")
    c = len(shuffle.perm)
    if len(v_in) != c or len(r_out) != c:
        return  # a side DepGraph did not trace whole: the shuffle stays a barrier
    for j, src in enumerate(shuffle.perm):
        links.chans.union(v_in[src], r_out[j])
    per = c // shuffle.groups
    links.ties += [[v_in[q * per + p] for q in range(shuffle.groups)] for p in range(per)]
    for g, _ in list(v_in.values()) + list(r_out.values()):
        links.comps.union(g, v_in[0][0])
    links.resolved |= {v_name, r_name}
    for name, chunk in _even_splits(dg, dg.kdprune_stand_ins[shuffle.first + 1], c):
        # x.chunk(n) after the shuffle splits the pruned width evenly: the same position goes from
        # every chunk, so the chunks stay equal
        links.ties += [[r_out[j + k * chunk] for k in range(c // chunk)] for j in range(chunk)]
        links.resolved.add(name)


def _link_slices(links: _Links, raws: Sequence[_Raw], dg: tp.DependencyGraph) -> None:
    """Input channel ``a + j`` of a channel slice is its piece's channel ``j``; pieces that must
    stay equal lose the same positions (a tie across the pieces of one call)."""
    calls: dict[int, list] = {}
    for m in getattr(dg, "kdprune_stand_ins", ()):
        if isinstance(m, ChannelSlice):
            calls.setdefault(id(m.call), []).append(m)
    for pieces in calls.values():
        if not all(m in dg.module2node for m in pieces):
            continue  # a piece DepGraph did not see (written into in place): the slice stays unlinked
        names = [dg._module2name[m] for m in pieces]
        x_in = _channel_owners(raws, names[0], "in")
        outs = [_channel_owners(raws, n, "out") for n in names]
        call = pieces[0].call
        if len(x_in) != call.width or any(len(o) != b - a for o, (a, b) in zip(outs, call.pieces)):
            continue  # a side DepGraph did not trace whole: the slice stays a barrier
        for o, (a, _) in zip(outs, call.pieces):
            for j, owner in o.items():
                links.join(x_in[a + j], owner)
        for g, _ in x_in.values():
            links.comps.union(g, x_in[0][0])
        if call.equal:
            n = call.pieces[0][1] - call.pieces[0][0]
            links.ties += [[x_in[a + j] for a, _ in call.pieces] for j in range(n)]
        links.resolved |= set(names)


_EXITS = ("sum", "mean")
_VIEWS = ("view", "reshape", "unflatten", "view_as", "reshape_as")


def _stacked_regions(dg: tp.DependencyGraph) -> list[tuple[list, list, list]]:
    """Per module that stacks feature maps along dim 1 (selective kernel): (its stacks, the
    reductions over the stacked axis, the views of an ``n * C`` channel vector as ``(n, C)``)."""
    by_module: dict[str, list] = {}
    for m in getattr(dg, "kdprune_stand_ins", ()):
        if isinstance(m, ChannelReshape) and m in dg.module2node:
            by_module.setdefault(m.call.module, []).append(m)
    found = []
    for ms in by_module.values():
        stacks = [m for m in ms if m.call.op == "stack"]
        if not stacks:
            continue
        n, c = stacks[0].call.after[1], stacks[0].call.after[2]
        exits = [m for m in ms if m.call.op in _EXITS and tuple(m.call.before[1:3]) == (n, c)]
        views = [m for m in ms if m.call.op in _VIEWS and len(m.call.after) >= 3 and m.call.before[1] == n * c
                 and tuple(m.call.after[1:3]) == (n, c)]
        if exits and all(tuple(m.call.after[1:3]) == (n, c) for m in stacks):
            found.append((stacks, exits, views))
    return found


def _link_stacks(links: _Links, raws: Sequence[_Raw], dg: tp.DependencyGraph) -> None:
    """Feature maps stacked along dim 1, mixed only along that axis, and reduced back: channel c
    of every stacked map, of every reduction and channels ``i * C + c`` of a viewed attention
    vector are one channel (the channel axis is dim 2 in between, which DepGraph cannot follow)."""
    for stacks, exits, views in _stacked_regions(dg):
        c = stacks[0].call.after[2]
        outs = [_channel_owners(raws, dg._module2name[m], "out") for m in exits]
        if any(len(o) != c for o in outs):
            continue
        anchor = outs[0]
        pairs = [(owner, anchor[l]) for o in outs[1:] for l, owner in o.items()]
        for m in stacks:
            pairs += [((g, r), anchor[l]) for g, mem in _locate(raws, dg._module2name[m], "in")
                      for l, r in zip(mem.idxs, mem.root_idxs)]
        for m in views:
            pairs += [(owner, anchor[l % c]) for l, owner in _channel_owners(raws, dg._module2name[m], "in").items()]
        for a, b in pairs:
            links.join(a, b)
        links.resolved |= {dg._module2name[m] for m in stacks + exits + views}


def _link_multiplier(links: _Links, raws: Sequence[_Raw], name: str, mod: nn.Module) -> None:
    """Input channel i of a channel multiplier owns output channels k*i .. k*i + k - 1."""
    a, b = _channel_owners(raws, name, "in"), _channel_owners(raws, name, "out")
    if len(a) != mod.in_channels or len(b) != mod.out_channels:
        return
    k = mod.out_channels // mod.in_channels
    for l, owner in b.items():
        links.join(owner, a[l // k])


def _merge_members(members: Iterable[Member]) -> tuple[Member, ...]:
    """One member per (name, role): a layer seen by several linked parts gets all its channels;
    ValueError when two parts map one layer channel to different group channels."""
    merged: dict[tuple[str, str], list] = {}
    for m in members:
        _, local = merged.setdefault((m.name, m.role), [m.kind, {}])
        for i, r in zip(m.idxs, m.root_idxs):
            if local.setdefault(i, r) != r:
                raise ValueError(f"linked groups map channel {i} of {m.name} twice (an op between them mixes "
                                 "channels in a way the engine cannot map, e.g. torch.stack across channels)")
    return tuple(Member(name, kind, role, tuple(sorted(local)), tuple(local[i] for i in sorted(local)))
                 for (name, role), (kind, local) in merged.items())


def link_ties(model: nn.Module, members: Sequence[Member],
              extra: Sequence[Sequence[int]] = ()) -> tuple[tuple[int, ...], ...]:
    """Tie classes over a group's channels (grouped convs other than multipliers: the same in-group
    position from every conv group; ``extra``: sets that must go together, e.g. a shuffle's); ()
    when nothing is tied. Classes may differ in size. ValueError when they cannot be honoured."""
    uf, any_tie = _UnionFind(), bool(extra)
    for tie in extra:
        for r in tie[1:]:
            uf.union(r, tie[0])
    for m in members:
        if m.kind != "gconv" or not m.idxs or is_multiplier(model.get_submodule(m.name)):
            continue
        width, per = _gconv_period(model, m)
        local = dict(zip(m.idxs, m.root_idxs))
        if len(local) != width:
            raise ValueError(f"grouped conv {m.name} reads channels of several channel groups "
                             f"({len(local)} of its {width} {m.role}put channels are in this one)")
        any_tie = True
        for l, r in local.items():
            uf.union(r, local[l % per])
    if not any_tie:
        return ()
    classes: dict[int, list[int]] = {}
    for r in sorted({r for m in members for r in m.root_idxs}):
        classes.setdefault(uf.find(r), []).append(r)
    out = tuple(tuple(c) for c in classes.values())
    if len(out) == 1:
        raise ValueError(f"grouped convs tie all {len(out[0])} channels of the group together")
    return out


def _blocker(model: nn.Module, parts: Sequence[_Raw], members: Sequence[Member], extra: list,
             shuffled: bool) -> str | None:
    """Why a (linked) group cannot be pruned, or None."""
    for p in parts:
        if p.excluded:
            return p.excluded if len(parts) == 1 else f"linked to the group of {p.root}, {p.excluded}"
    for m in members:
        if m.kind in _UNPRUNABLE:
            return _UNPRUNABLE[m.kind].format(name=m.name)
        if m.kind == "split" and shuffled:
            # a split not fed straight by the shuffle: its sizes cannot be kept consistent
            return f"a channel split ({m.name}) is linked to a channel shuffle but not fed by it"
    bad = invalid_member(model, members)
    if bad is not None:
        return f"{bad}; an unsupported channel op breaks the index mapping"
    try:
        link_ties(model, members, extra)
    except ValueError as e:
        return str(e)
    return None


def _compound(model: nn.Module, raws: Sequence[_Raw], idxs: list[int], links: _Links) -> GroupStatus:
    """The group made of the DepGraph groups ``idxs`` (one, or several linked)."""
    cls: dict = {}
    gmap: dict[int, dict[int, int]] = {}  # part -> its root channel -> group channel
    for gi in idxs:  # group channels numbered in module order: the first part keeps its numbering
        gmap[gi] = {r: cls.setdefault(links.chans.find((gi, r)), len(cls)) for r in raws[gi].ids}
    parts = [raws[g] for g in idxs]
    resolved = links.resolved
    shuffled = any(m.name in resolved for p in parts for m in p.members)
    extra = [[gmap[g][r] for g, r in tie] for tie in links.ties if tie[0][0] in gmap]
    try:
        members = _merge_members(
            Member(m.name, m.kind, m.role, m.idxs, tuple(gmap[gi][r] for r in m.root_idxs))
            for gi in idxs for m in raws[gi].members if m.name not in resolved)
        why = _blocker(model, parts, members, extra, shuffled)
    except ValueError as e:
        members, why = tuple(m for p in parts for m in p.members), str(e)
    # a slice linked inside one DepGraph group still needs the linked cut (its stand-in follows the removal)
    identity = (len(idxs) == 1 and all(r == c for r, c in gmap[idxs[0]].items())
                and not any(m.name in resolved for m in raws[idxs[0]].members))
    group = ChannelGroup(
        index=-1, root=parts[0].root, dim="out", channels=len(cls), members=members,
        sites=tuple(sorted({s for p in parts for s in p.sites})),
        ties=() if why else link_ties(model, members, extra),
        parts=() if identity else tuple(Part(raws[g].root, tuple(gmap[g].get(i, -1) for i in range(raws[g].width)))
                                        for g in idxs))
    return GroupStatus(group, why)


def raw_group_table(model: nn.Module, example_input: torch.Tensor, ignored_layers: Sequence[nn.Module | str] = (),
                    dg: tp.DependencyGraph | None = None,
                    root_types: tuple[type, ...] = (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)) -> list[GroupStatus]:
    """Every channel group (DepGraph, Fang et al. 2023, linked where a shuffle, a channel slice, a
    channel multiplier or a grouped conv couples several), in module order, with why it stays
    whole; not yet checked for exactness (``kdprune.engine.groups.group_table`` is)."""
    dg = dg or build_graph(model, example_input)
    excluded = {m: "ignored by the caller" for m in resolve_layers(model, ignored_layers)}
    excluded.update({m: "classifier output" for m in classifier_layers(model, dg)})
    names = {m: n for n, m in model.named_modules()}
    raws = _raw_groups(model, dg, {m: (names.get(m, "?"), why) for m, why in excluded.items()}, root_types)
    links = _link(raws, model, dg)
    comp_of: dict[int, list[int]] = {}
    for i in range(len(raws)):
        comp_of.setdefault(links.comps.find(i), []).append(i)
    return [_compound(model, raws, idxs, links) for idxs in sorted(comp_of.values(), key=min)]
