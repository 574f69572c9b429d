"""Channel groups from torch-pruning's DepGraph (Fang et al. 2023, "DepGraph: Towards Any
Structural Pruning"), plus the kdprune rules on top: never prune the classifier output, and leave
channels that flow through parameter-free channel-changing modules (ResNet option-A
``PadShortcut``) unpruned, because DepGraph cannot see through a zero channel pad.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner import function as tpf

from kdprune.engine.positional import pad_positions, positional_pairs
from kdprune.engine.reshape import (ChannelReshape, ChannelShuffle, find_channel_shuffles, routed_forward,
                                    trace_channel_ops)
from kdprune.engine.slices import ChannelSlice, derive_sources, slice_calls

__all__ = [
    "Member", "Part", "ChannelGroup", "build_graph", "find_barriers",
    "tp_group", "classifier_layers", "resolve_layers", "BARRIER_ATTR", "is_placer",
    "TRACE_TIMEOUT_S", "TraceTimeout",
]

#: Class or instance attribute that overrides barrier detection: True forces a module to be
#: treated as a channel barrier (its in/out channels are decoupled and every group touching it is
#: left unpruned), False forces it to be traced as an ordinary channel-preserving op.
BARRIER_ATTR = "kdprune_channel_barrier"

# Containers never become barriers themselves (their param-free children are checked instead);
# registering e.g. nn.Sequential as a tp customized layer would affect every Sequential.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

_KIND = {
    ops.OPTYPE.CONV: "conv", ops.OPTYPE.DEPTHWISE_CONV: "dwconv", ops.OPTYPE.BN: "bn",
    ops.OPTYPE.LINEAR: "linear", ops.OPTYPE.CONCAT: "cat", ops.OPTYPE.SPLIT: "split",
    ops.OPTYPE.LN: "ln", ops.OPTYPE.GN: "gn", ops.OPTYPE.IN: "in", ops.OPTYPE.PRELU: "prelu",
    ops.OPTYPE.CUSTOMIZED: "barrier", ops.OPTYPE.OUTPUT: "output",
}
# Member kinds that own per-output-channel parameters: where a channel "lives" after each op.
PARAM_KINDS = ("conv", "dwconv", "gconv", "linear", "bn", "gn", "in", "ln", "prelu")


@dataclass(frozen=True)
class Member:
    """One layer/op coupled in a channel group, with its local <-> root channel mapping."""

    name: str  # module FQN, or "<op>" label for anonymous ops (adds, concat, reshape...)
    kind: str  # conv | dwconv | gconv | bn | linear | add | cat | barrier | ...
    role: str  # "out": its output channels are removed; "in": its input channels are removed
    idxs: tuple[int, ...]  # local channel indices in this member ...
    root_idxs: tuple[int, ...]  # ... and the root channel each one corresponds to


@dataclass(frozen=True)
class Part:
    """One DepGraph group inside a linked ChannelGroup (see ``kdprune.engine.links``): its root and
    the group channel each of its root channels belongs to (several may share one; -1 where the
    root channel is in another part)."""

    root: str
    map: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """A set of coupled channels that must be pruned together (one DepGraph group).

    ``index`` is the position in the list returned by ``channel_groups`` (which is sorted by the
    root's position in ``model.named_modules()``); ``tp_group(dg, model, group)`` gets back the
    torch-pruning group. ``sites`` are the members whose outputs carry the group's channels after
    their last per-channel affine op (conv without BN, or the BN after a conv): zeroing or masking
    the channel there is equivalent to removing it.
    """

    index: int
    root: str
    dim: str
    channels: int
    members: tuple[Member, ...]
    sites: tuple[str, ...]
    # Root channels that must go together (grouped convs: the same position in every conv group,
    # see ``kdprune.engine.links.link_ties``); empty when every channel can be removed on its own.
    ties: tuple[tuple[int, ...], ...] = ()
    # The DepGraph groups this one links (shuffle, channel multiplier, grouped conv over several
    # groups), the first being ``root``'s; empty for a plain group (one part, numbered as its root).
    parts: tuple[Part, ...] = ()

    @property
    def tie_size(self) -> int:
        """The step in which the group's width moves: 1 unless ties bind channels (the greatest
        common divisor of the tie-class sizes, which may differ in a linked group)."""
        return math.gcd(*(len(c) for c in self.ties)) if self.ties else 1

    def member(self, name: str) -> Member:
        """The member named ``name`` (KeyError if absent)."""
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"{name!r} is not a member of group {self.root!r}")

    @property
    def producers(self) -> tuple[Member, ...]:
        """Members whose output channels (weights) are removed: convs, linears, BNs..."""
        return tuple(m for m in self.members if m.role == "out" and m.kind in PARAM_KINDS)


def is_placer(module: nn.Module) -> bool:
    """Whether a channel barrier implements the channel-placer protocol: ``kdprune_channels() ->
    (in, out)``, ``kdprune_prune_inputs(idxs)`` and ``kdprune_prune_outputs(idxs)`` (a module that
    places each input channel at a fixed output channel, zeros elsewhere: the option-A shortcut).
    Both sides of a placer can be pruned, as separate groups; masks act on its output as a hard
    keep/drop, and folding a zero mask calls its ``kdprune_zero_outputs(idxs)``."""
    return all(callable(getattr(module, a, None))
               for a in ("kdprune_channels", "kdprune_prune_inputs", "kdprune_prune_outputs"))


class _BarrierPruner(tpf.BasePruningFunc):
    """tp pruner for channel barriers: distinct in/out functions decouple the two sides; a
    channel placer is resized through its protocol, any other barrier is never pruned."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if is_placer(layer):
            layer.kdprune_prune_outputs(sorted(int(i) for i in idxs))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if is_placer(layer) or isinstance(layer, ChannelSlice):
            layer.kdprune_prune_inputs(sorted(int(i) for i in idxs))
        elif getattr(layer, "positional", None):  # ECA's channel vector loses positions
            conv, width = layer.positional
            pad_positions(conv, sorted(int(i) for i in idxs), width)
        return layer

    # Real widths where a stand-in knows them: DepGraph infers a flatten's input width through
    # whatever input it finds first, and an unknown width there maps indices by a wrong ratio.
    def get_out_channels(self, layer: nn.Module) -> int | None:
        if isinstance(layer, ChannelSlice):
            a, b = layer.bounds
            return b - a
        if isinstance(layer, ChannelReshape) and len(layer.call.after) > 1:
            return layer.call.after[1]
        return layer.kdprune_channels()[1] if is_placer(layer) else None

    def get_in_channels(self, layer: nn.Module) -> int | None:
        if isinstance(layer, ChannelSlice):
            return len(layer.kept)
        if isinstance(layer, ChannelReshape):
            return layer.call.before[1]
        return layer.kdprune_channels()[0] if is_placer(layer) else None


def barrier_pruners(types: Iterable[type]) -> dict[type, tpf.BasePruningFunc]:
    """torch-pruning ``customized_pruners`` for these barrier module types: placers are resized
    through their protocol, other barriers never pruned (for code that drives torch-pruning's
    own pruners on kdprune models, e.g. the peer recipes)."""
    return {t: _BarrierPruner() for t in types}


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def find_barriers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of parameter-free modules whose forward changes the channel count (e.g. option-A
    zero-pad shortcuts), or that set ``kdprune_channel_barrier = True``; innermost only."""
    changed: set[str] = set()
    hooks = []

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
                return  # multi-input modules (e.g. a Concat module) legitimately change width
            x = args[0]
            if x.dim() >= 3 and out.dim() == x.dim() and out.shape[1] != x.shape[1]:
                changed.add(name)
        return hook

    for name, m in model.named_modules():
        flag = getattr(m, BARRIER_ATTR, None)
        if name and flag is None and not _has_params(m) and not isinstance(m, _CONTAINERS):
            hooks.append(m.register_forward_hook(make_hook(name)))
        elif name and flag:
            changed.add(name)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _masks_disabled(model):
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    # Keep the innermost: a param-free wrapper around a barrier would otherwise be registered too.
    return sorted(n for n in changed if not any(o.startswith(n + ".") for o in changed))


@contextlib.contextmanager
def _masks_disabled(model: nn.Module) -> Iterator[None]:
    """Bypass attached soft masks while tracing: their gates must not enter the DepGraph."""
    masks = getattr(model, "kdprune_masks", None)
    if masks is None:
        yield
        return
    old, masks.enabled = masks.enabled, False
    try:
        yield
    finally:
        masks.enabled = old


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` into a torch-pruning DependencyGraph (DepGraph, Fang et al. 2023), with
    channel barriers (see ``find_barriers``) and functional channel reshapes (see
    ``kdprune.engine.reshape``) registered as decoupling custom layers; the trace is stopped with
    a clear error after ``TRACE_TIMEOUT_S`` seconds."""
    barriers = find_barriers(model, example_input)
    classes = {type(model.get_submodule(n)) for n in barriers}
    was_training = model.training
    try:
        model.eval()
        with _masks_disabled(model):
            calls, sliced = trace_channel_ops(model, example_input)
            sliced = derive_sources(model, example_input, sliced)  # bounds computed from an attribute
            shuffles = find_channel_shuffles(model, example_input, calls)
            taken = {s.first for s in shuffles} | {s.first + 1 for s in shuffles}
            pairs = positional_pairs(model, calls, taken)
    finally:
        model.train(was_training)
    reshapes, slices = [ChannelReshape(c) for c in calls], slice_calls(sliced)
    for k, conv in pairs:  # ECA: linked as a shuffle that keeps every channel in place; see positional.py
        shuffles.append(ChannelShuffle(k, 1, tuple(range(calls[k].before[1]))))
        reshapes[k].positional = (model.get_submodule(conv), calls[k].before[1])
    stand_ins = nn.ModuleList(reshapes + slices)
    classes |= {type(m) for m in stand_ins}
    if stand_ins:
        model.add_module(_RESHAPES_ATTR, stand_ins)  # tp hooks only the model's own modules
    pruner = _BarrierPruner()
    try:
        with torch.enable_grad(), _masks_disabled(model), _time_limit(TRACE_TIMEOUT_S):
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False,
                forward_fn=routed_forward(nn.ModuleList(reshapes), slices) if stand_ins else None,
                customized_pruners={c: pruner for c in classes},
            )
    finally:
        model.train(was_training)  # tp's tracer leaves the model in eval mode
        if stand_ins:
            delattr(model, _RESHAPES_ATTR)
    labels = [m.call.describe() if isinstance(m, ChannelReshape) else m.call.describe(m.piece) for m in stand_ins]
    for k, m in enumerate(stand_ins):  # member names must be unique: number repeated labels
        dg._module2name[m] = labels[k] if labels.count(labels[k]) == 1 else f"{labels[k][:-1]} #{k}>"
    dg.kdprune_barrier_classes = tuple(classes)
    dg.kdprune_stand_ins = tuple(stand_ins)
    # (name of the shuffle's first stand-in, of its second, the shuffle): linked, not barriers
    dg.kdprune_shuffles = tuple((dg._module2name[stand_ins[s.first]], dg._module2name[stand_ins[s.first + 1]], s)
                                for s in shuffles)
    return dg


#: Prefix of a linked part rooted at a shuffle's output (no layer produces those channels): the
#: k-th channel reshape of the forward, stable across pruning (unlike its shape-bearing label).
RESHAPE_ROOT = "@reshape:"


def stand_in_root(dg: tp.DependencyGraph, name: str) -> nn.Module | None:
    """The stand-in module a ``@reshape:k`` part root names on this graph (None: not such a name)."""
    if not name.startswith(RESHAPE_ROOT):
        return None
    k = int(name[len(RESHAPE_ROOT):])
    stand_ins = getattr(dg, "kdprune_stand_ins", ())
    if not 0 <= k < len(stand_ins):
        raise ValueError(f"prune_channels: {name!r} names no channel reshape of this model ({len(stand_ins)} found)")
    return stand_ins[k]


#: Seconds DepGraph may trace before kdprune stops it: a reshape or permutation it cannot follow
#: can otherwise make it run for minutes with memory growing.
TRACE_TIMEOUT_S = 120.0
_RESHAPES_ATTR = "_kdprune_channel_reshapes"


class TraceTimeout(RuntimeError):
    """DepGraph tracing exceeded TRACE_TIMEOUT_S."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TraceTimeout after ``seconds`` (main thread on POSIX only; elsewhere no limit). A
    library must not take the process's alarm from its user: when a SIGALRM handler of theirs is
    installed or a real-time timer is running, there is no limit either."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None) or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return

    def fire(signum: int, frame: object) -> None:
        raise TraceTimeout(
            f"torch-pruning's DepGraph did not finish tracing within {seconds:.0f} s: the model likely "
            "reshapes or permutes channels in a way it cannot follow; declare the module doing it a "
            f"barrier with `{BARRIER_ATTR} = True`, or raise kdprune.engine.graph.TRACE_TIMEOUT_S")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def resolve_layers(model: nn.Module, layers: Iterable[nn.Module | str]) -> list[nn.Module]:
    """Modules given as objects or FQNs -> module objects (ValueError on unknown names)."""
    out = []
    for layer in layers:
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"ignored layer {layer!r} is not a submodule of the model") from None
        out.append(layer)
    return out


def classifier_layers(model: nn.Module, dg: tp.DependencyGraph) -> list[nn.Module]:
    """Layers whose output channels must never be pruned: ``model.classifier_name`` (or the last
    nn.Linear) and every conv/linear whose output reaches the model output without another
    parametric layer in between."""
    found: list[nn.Module] = []
    name = getattr(model, "classifier_name", None)
    if name:
        found.append(model.get_submodule(name))
    else:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        found.extend(linears[-1:])
    stack = [n for n in dg.module2node.values() if n.type == ops.OPTYPE.OUTPUT]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for src in node.inputs:
            if isinstance(src.module, (ops.TORCH_CONV, ops.TORCH_LINEAR)):
                found.append(src.module)
            else:
                stack.append(src)
    return found


def _member_kind(dg: tp.DependencyGraph, node) -> str:
    m = node.module
    if isinstance(m, ops.TORCH_CONV) and node.type == ops.OPTYPE.CONV and m.groups > 1:
        return "gconv"
    if node.type == ops.OPTYPE.DEPTHWISE_CONV and m.in_channels != m.out_channels:
        return "oddconv"  # tp calls groups == out_channels depthwise and resizes its inputs wrongly
    if node.type == ops.OPTYPE.SLICE:
        dim = getattr(m, "dim", None)
        return "slice" if dim is None or dim == 1 or dim < 0 else "op"  # a channel slice (x[:, a:b])
    if node.type == ops.OPTYPE.CUSTOMIZED and is_placer(m):
        return "place"
    if node.type == ops.OPTYPE.ELEMENTWISE:
        label = str(getattr(m, "_grad_fn", "op")).lower()
        return "add" if "add" in label else "op"
    return _KIND.get(node.type, "op")


def _member_name(dg: tp.DependencyGraph, node) -> str:
    return dg._module2name.get(node.module) or f"<{node.module!r}>"


def _members(dg: tp.DependencyGraph, group) -> tuple[Member, ...]:
    out = []
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        role = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
        out.append(Member(
            name=_member_name(dg, dep.target), kind=_member_kind(dg, dep.target), role=role,
            idxs=tuple(int(i) for i in idxs), root_idxs=tuple(int(i) for i in item.root_idxs),
        ))
    return tuple(out)


def _sites(dg: tp.DependencyGraph, model: nn.Module, members: tuple[Member, ...]) -> tuple[str, ...]:
    """Producers whose output is the last per-channel op: skip a conv/linear feeding only a BN
    that is itself in the group (the BN output is where the channel is finally formed). A channel
    placer's output is a site too: masking it there is what removing the channel does."""
    names = {m.name for m in members if m.role == "out" and m.kind in PARAM_KINDS + ("place",)}
    sites = []
    for name in sorted(names):
        node = dg.module2node[model.get_submodule(name)]
        outs = node.outputs
        if (node.type in (ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.LINEAR)
                and len(outs) == 1 and outs[0].type == ops.OPTYPE.BN
                and _member_name(dg, outs[0]) in names):
            continue
        sites.append(name)
    return tuple(sites)


# Member kinds that make their whole group unprunable, and why (grouped convs are pruned under
# tie constraints instead, see kdprune.engine.links.link_ties). Barriers cannot be resized; a conv with groups equal
# to its outputs but not its inputs has no even split; and DepGraph maps indices through channel
# slices wrongly (a sliced-then-concatenated channel lands on the wrong consumer input).
_UNPRUNABLE = {
    "barrier": "coupled to channel barrier {name}",
    "oddconv": "coupled to conv {name} whose groups equal its output but not its input channels",
    "slice": "coupled to a channel slice (x[:, a:b]), whose index mapping is not supported yet",
}


def _gconv_period(model: nn.Module, m: Member) -> tuple[int, int]:
    """(width, channels per conv group) of a grouped conv member on its side."""
    conv = model.get_submodule(m.name)
    width = conv.in_channels if m.role == "in" else conv.out_channels
    return width, width // conv.groups


def _width(module: nn.Module, role: str) -> int | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if role == "out" else module.in_channels
    return None


def invalid_member(model: nn.Module, members: Sequence[Member]) -> str | None:
    """A member whose indices exceed its layer's real width (DepGraph lost track of the channel
    mapping), described for a warning; None when every index fits."""
    for m in members:
        if m.kind not in PARAM_KINDS or not m.idxs or m.name.startswith("<"):
            continue
        width = _width(model.get_submodule(m.name), m.role)
        if width is not None and max(m.idxs) >= width:
            return f"{m.name} ({m.role}put index {max(m.idxs)} >= its {width} channels)"
    return None


def tp_group(dg: tp.DependencyGraph, model: nn.Module, group: ChannelGroup | str,
             idxs: Sequence[int] | None = None):
    """The torch-pruning group for ``group`` (full channels, or only ``idxs`` to prune)."""
    root_name = group.root if isinstance(group, ChannelGroup) else group
    try:
        root = model.get_submodule(root_name)
    except AttributeError:
        raise ValueError(f"group root {root_name!r} is not a submodule of the model") from None
    if root not in dg.module2node:
        raise ValueError(f"group root {root_name!r} is not on the traced graph")
    pruner = dg.get_pruner_of_module(root)
    if idxs is None:
        idxs = range(pruner.get_out_channels(root))
    return dg.get_pruning_group(root, pruner.prune_out_channels, list(idxs))
