"""Functional reshapes over the channel dimension (a channel shuffle's ``view -> transpose ->
reshape``, ``x.view(b, g, c // g, h, w)``...) made visible to DepGraph as channel barriers.

torch-pruning maps channel indices through reshapes by ratio arithmetic that is only right for a
flatten: on a channel shuffle it maps indices wrongly, divides by zero, or (on larger nets) runs
for minutes with memory growing. A reshape written inline in ``forward`` is not a module, so it
cannot be declared a barrier like the option-A shortcut. Here each such call is found by a first
forward under a ``TorchFunctionMode``, and during DepGraph's own trace the same call is routed
through a parameter-free stand-in module (``ChannelReshape``) that the graph treats as a barrier:
channels on either side stay whole, with the reason named in ``describe``. Flattens to
``(batch, features)`` are left to DepGraph, which handles them.

A channel shuffle (two consecutive channel reshapes in one module, the second restoring the
first's input shape, with only data movement between them) is recognised by
``find_channel_shuffles``: its permutation is read by sending channel indices through it, checked
on the real activations, and kept when it has the shuffle form ``out[j] = in[(j % g) * (C / g) + j
// g]``. The engine then links the channel groups on both sides (``kdprune.engine.links``) instead
of leaving them whole.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kdprune.engine.slices import (SLICERS, ChannelSlice, SliceCall, channel_pieces, slice_call, write_call,
                                   write_rest)

__all__ = ["ChannelReshape", "ReshapeCall", "ChannelShuffle", "find_channel_reshapes", "find_channel_shuffles",
           "routed_forward", "trace_channel_ops"]

# transposes that move the channel dim of a feature map (an attention across channels, as ECA's
# 1-D conv over the pooled channels): barriers too; on the 5-D view inside a channel shuffle they
# are the shuffle's own data movement, probed by find_channel_shuffles, not channel reshapes
_TRANSPOSES = frozenset({
    torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute, torch.Tensor.movedim,
    torch.movedim, torch.Tensor.swapaxes, torch.swapaxes, torch.Tensor.swapdims, torch.swapdims,
})
# a stack of feature maps along dim 1 (selective-kernel branches) and a reduction over that axis
# back to a feature map: the channel axis moves to dim 2 and back (linked in engine/links.py)
_STACKS = frozenset({torch.stack})
_REDUCTIONS = frozenset({torch.Tensor.sum, torch.sum, torch.Tensor.mean, torch.mean})
_RESHAPES = frozenset({
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
    torch.Tensor.unflatten, torch.unflatten, torch.Tensor.view_as, torch.Tensor.reshape_as,
}) | _TRANSPOSES | _STACKS | _REDUCTIONS


@dataclass(frozen=True)
class ReshapeCall:
    """One channel-changing reshape seen in the forward: where it ran and what it did."""

    module: str  # innermost module whose forward made the call ("" = the model itself)
    op: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    since: tuple[str, ...] = ()  # other modules that ran torch ops since the previous channel reshape

    def describe(self) -> str:
        """A readable label, used as the barrier's name."""
        where = self.module or "the model's forward"
        return f"<channel reshape in {where}: {self.op} {list(self.before)} -> {list(self.after)}>"


class ChannelReshape(nn.Module):
    """Stand-in for one functional channel reshape while DepGraph traces (a channel barrier)."""

    kdprune_channel_barrier = True

    def __init__(self, call: ReshapeCall) -> None:
        super().__init__()
        self.call = call
        # (the 1-D conv, the vector's width) when this reshape moves a channel vector into the
        # length axis of a positional conv (ECA, see kdprune.engine.positional)
        self.positional: tuple[nn.Module, int] | None = None

    def forward(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return fn(*args, **kwargs)


def _stack_or_reduction(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """``torch.stack(maps, 1)`` of equal 4-D maps, or a sum/mean over dim 1 of a 5-D tensor."""
    if not isinstance(out, torch.Tensor):
        return False
    if func in _STACKS:
        xs, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
        return (isinstance(xs, (list, tuple)) and len(xs) > 1 and dim == 1
                and all(isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape == xs[0].shape for x in xs))
    x, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    return (isinstance(x, torch.Tensor) and x.dim() == 5 and dim in (1, (1,), [1]) and not keep
            and out.dim() == 4)


def _is_channel_reshape(func: Any, args: tuple, out: Any, kwargs: dict | None = None) -> bool:
    if func in _STACKS or func in _REDUCTIONS:
        return bool(args) and _stack_or_reduction(func, args, kwargs or {}, out)
    if func not in _RESHAPES or not args or not isinstance(args[0], torch.Tensor):
        return False
    x = args[0]
    if func in _TRANSPOSES and x.dim() > 4:
        return False
    if not isinstance(out, torch.Tensor) or x.dim() < 3 or out.dim() == 2:
        return False  # (batch, features) flattens are DepGraph's own, correctly mapped case
    return out.dim() < 2 or out.shape[1] != x.shape[1]


class _Record(TorchFunctionMode):
    def __init__(self, stack: list[str], model: nn.Module) -> None:
        super().__init__()
        self.stack, self.model, self.calls = stack, model, []
        self.slices: list[tuple[SliceCall, nn.Module]] = []
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_channel_reshape(func, args, out, kwargs):
            op = getattr(func, "__name__", str(func))
            since = tuple(sorted(self.seen - {self.stack[-1]}))
            first = args[0][0] if func in _STACKS else args[0]
            self.calls.append(ReshapeCall(self.stack[-1], op, tuple(first.shape), tuple(out.shape), since))
            self.seen = set()
            return out
        self.seen.add(self.stack[-1])
        if func in SLICERS or func is torch.Tensor.__setitem__:
            owner = self.model.get_submodule(self.stack[-1])
            call = (write_call(args, self.stack[-1], owner) if func is torch.Tensor.__setitem__
                    else slice_call(func, args, kwargs, out, self.stack[-1], owner))
            if call is not None:
                self.slices.append((call, owner))
        return out


class _Route(TorchFunctionMode):
    """Sends the k-th channel reshape through ``stand_ins[k]`` and each piece of the j-th channel
    slice through its ChannelSlice, so that DepGraph sees them as modules."""

    def __init__(self, stand_ins: nn.ModuleList, slices: Sequence[ChannelSlice] = ()) -> None:
        super().__init__()
        self.stand_ins, self.k = stand_ins, 0
        self.slices, self.j = slices, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RESHAPES and self.k < len(self.stand_ins):
            out = func(*args, **kwargs)
            if _is_channel_reshape(func, args, out, kwargs):
                self.k += 1
                return self.stand_ins[self.k - 1](func, args, kwargs)  # recomputed under the module
            return out
        if func in SLICERS and self.j < len(self.slices):
            out = func(*args, **kwargs)
            pieces = channel_pieces(func, args, kwargs, out)
            if pieces is None:
                return out
            routed = [self.slices[self.j + p](args[0]) for p in range(len(pieces))]
            self.j += len(pieces)
            return routed[0] if isinstance(out, torch.Tensor) else type(out)(routed)
        if func is torch.Tensor.__setitem__ and self.j < len(self.slices):
            found = write_rest(args)
            if found is not None:
                return self._write(args[0], args[2], found[0][0] == 0)
        return func(*args, **kwargs)

    def _write(self, base: torch.Tensor, value: torch.Tensor, first: bool) -> None:
        """``base[:, a:b] = value`` traced as ``base <- cat(value, rest of base)`` (or the rest first):
        DepGraph follows the concat and the rest's stand-in, then couples base's channels one to
        one with the result through the copy."""
        rest = self.slices[self.j](base)
        self.j += 1
        base.copy_(torch.cat([value, rest] if first else [rest, value], 1))


@dataclass(frozen=True)
class ChannelShuffle:
    """Channel reshapes ``first`` and ``first + 1`` (call order) form a channel shuffle: output
    channel j is input channel ``perm[j] = (j % groups) * (C / groups) + j // groups``."""

    first: int
    groups: int
    perm: tuple[int, ...]


class _Done(Exception):
    """Stops a probing forward once every shuffle's output has been read."""


class _Probe(TorchFunctionMode):
    """Sends channel indices through each candidate pair: at its first call the input is replaced
    by a tensor holding each channel's index, at its second the output is read back."""

    def __init__(self, pairs: dict[int, int]) -> None:
        super().__init__()
        self.pairs, self.k = pairs, 0
        self.read: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _RESHAPES or not _is_channel_reshape(func, args, out, kwargs):
            return out
        k, self.k = self.k, self.k + 1
        if k in self.pairs:
            x = args[0]
            shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
            probe = torch.arange(x.shape[1], dtype=x.dtype, device=x.device).view(shape).expand_as(x)
            return func(probe.contiguous(), *args[1:], **kwargs)
        if k - 1 in self.pairs:
            self.read[k - 1] = out.detach().clone()
            if len(self.read) == len(self.pairs):
                raise _Done
        return out


def _shuffle_groups(perm: list[int]) -> int | None:
    """The g for which ``perm`` is a channel shuffle of g groups, or None."""
    c = len(perm)
    for g in range(2, c):
        if c % g == 0 and all(perm[j] == (j % g) * (c // g) + j // g for j in range(c)):
            return g
    return None


def _as_shuffle(first: int, x: torch.Tensor, y_probe: torch.Tensor,
                y_real: torch.Tensor | None) -> ChannelShuffle | None:
    """The shuffle a probed pair is, or None (not pure data movement, not a permutation, not a shuffle)."""
    idx = y_probe.transpose(0, 1).reshape(y_probe.shape[1], -1)
    if not torch.all(idx == idx[:, :1]):
        return None  # something other than data movement ran between the two reshapes
    perm = [int(v) for v in idx[:, 0]]
    if sorted(perm) != list(range(x.shape[1])) or y_real is None or not torch.equal(y_real, x[:, perm]):
        return None
    g = _shuffle_groups(perm)
    return ChannelShuffle(first, g, tuple(perm)) if g else None


def find_channel_shuffles(model: nn.Module, example_input: torch.Tensor,
                          calls: list[ReshapeCall]) -> list[ChannelShuffle]:
    """The channel shuffles among ``calls`` (see ChannelShuffle): two probing forwards."""
    moves = {c.op for c in calls} - {"stack", "sum", "mean"}  # a shuffle only moves data
    pairs = {k: k + 1 for k in range(len(calls) - 1)
             if calls[k].module == calls[k + 1].module and calls[k].before == calls[k + 1].after
             and len(calls[k].before) >= 3 and calls[k].op in moves and calls[k + 1].op in moves}
    if not pairs:
        return []
    with torch.no_grad():
        real = _RealTensors(pairs)
        with real:
            model(example_input)
        probe = _Probe(pairs)
        try:
            with probe:
                model(example_input)
        except _Done:
            pass
        except Exception:  # noqa: BLE001 - index values broke a later op: leave the reshapes barriers
            return []
    found = (_as_shuffle(k, real.ins[k], probe.read[k], real.outs.get(k + 1)) for k in pairs
             if k in probe.read and k in real.ins)
    return [s for s in found if s is not None]


class _RealTensors(TorchFunctionMode):
    """The real input of each pair's first channel reshape and output of its second."""

    def __init__(self, pairs: dict[int, int]) -> None:
        super().__init__()
        self.pairs, self.k = pairs, 0
        self.ins: dict[int, torch.Tensor] = {}
        self.outs: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RESHAPES and _is_channel_reshape(func, args, out, kwargs):
            if self.k in self.pairs:
                self.ins[self.k] = args[0].detach().clone()
            if self.k in self.pairs.values():
                self.outs[self.k] = out.detach().clone()
            self.k += 1
        return out


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    stack = [""]
    names = {m: n for n, m in model.named_modules()}

    def enter(mod: nn.Module, args: Any) -> None:
        stack.append(names.get(mod, stack[-1]))

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        stack.pop()  # returning nothing: a forward hook's return value would replace the output

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


def find_channel_reshapes(model: nn.Module, example_input: torch.Tensor) -> list[ReshapeCall]:
    """Every functional reshape that changes the channel dimension, in call order."""
    return trace_channel_ops(model, example_input)[0]


def trace_channel_ops(model: nn.Module, example_input: torch.Tensor
                      ) -> tuple[list[ReshapeCall], list[tuple[SliceCall, nn.Module]]]:
    """Every functional channel reshape and every channel slice (with the module that sliced), in
    call order: one forward."""
    with torch.no_grad(), _module_stack(model) as stack:
        mode = _Record(stack, model)
        with mode:
            model(example_input)
    return mode.calls, mode.slices


def routed_forward(stand_ins: nn.ModuleList, slices: Sequence[ChannelSlice] = ()
                   ) -> Callable[[nn.Module, torch.Tensor], Any]:
    """A ``forward_fn`` for DepGraph that sends the k-th channel reshape through ``stand_ins[k]``
    and every channel slice piece through its stand-in."""
    def forward(model: nn.Module, x: torch.Tensor) -> Any:
        with _Route(stand_ins, slices):
            return model(x)
    return forward
