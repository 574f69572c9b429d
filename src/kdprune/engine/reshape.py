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
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ChannelReshape", "ReshapeCall", "find_channel_reshapes", "routed_forward"]

_RESHAPES = frozenset({
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
    torch.Tensor.unflatten, torch.unflatten, torch.Tensor.view_as, torch.Tensor.reshape_as,
})


@dataclass(frozen=True)
class ReshapeCall:
    """One channel-changing reshape seen in the forward: where it ran and what it did."""

    module: str  # innermost module whose forward made the call ("" = the model itself)
    op: str
    before: tuple[int, ...]
    after: tuple[int, ...]

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

    def forward(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return fn(*args, **kwargs)


def _is_channel_reshape(func: Any, args: tuple, out: Any) -> bool:
    if func not in _RESHAPES or not args or not isinstance(args[0], torch.Tensor):
        return False
    x = args[0]
    if not isinstance(out, torch.Tensor) or x.dim() < 3 or out.dim() == 2:
        return False  # (batch, features) flattens are DepGraph's own, correctly mapped case
    return out.dim() < 2 or out.shape[1] != x.shape[1]


class _Record(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack, self.calls = stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _is_channel_reshape(func, args, out):
            op = getattr(func, "__name__", str(func))
            self.calls.append(ReshapeCall(self.stack[-1], op, tuple(args[0].shape), tuple(out.shape)))
        return out


class _Route(TorchFunctionMode):
    def __init__(self, stand_ins: nn.ModuleList) -> None:
        super().__init__()
        self.stand_ins, self.k = stand_ins, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RESHAPES and self.k < len(self.stand_ins):
            out = func(*args, **kwargs)
            if _is_channel_reshape(func, args, out):
                self.k += 1
                return self.stand_ins[self.k - 1](func, args, kwargs)  # recomputed under the module
            return out
        return func(*args, **kwargs)


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
    with torch.no_grad(), _module_stack(model) as stack:
        mode = _Record(stack)
        with mode:
            model(example_input)
    return mode.calls


def routed_forward(stand_ins: nn.ModuleList) -> Callable[[nn.Module, torch.Tensor], Any]:
    """A ``forward_fn`` for DepGraph that sends the k-th channel reshape through ``stand_ins[k]``."""
    def forward(model: nn.Module, x: torch.Tensor) -> Any:
        with _Route(stand_ins):
            return model(x)
    return forward
