"""Residual blocks for block pruning: the block protocol and the ``remove_block`` edit.

Block protocol (models implement it; the engine imports no model): a residual block has
``residual_parts() -> {"pre": [names], "shortcut": name | None, "post": name | None}`` (or
None when it has no residual connection): the modules applied to the input before the shortcut
(a pre-activation block's BN-ReLU when its projection reads the activated input), the shortcut
module (None: identity), and the module applied after the addition (e.g. the second ReLU of a
post-activation BasicBlock); a model lists its blocks with ``residual_blocks() -> [names]``.
Removing a block keeps ``post(shortcut(pre(x)))``: exactly the block with its branch output
zeroed, which is what a zero soft mask on the branch computes (OED's removal).

Models without the protocol fall back to discovery (kdprune.engine.discover), which needs an
example input; its parts may add ``"post_fn"`` (a functional activation after the sum)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdprune.engine.discover import POST_FUNCTIONS, discover_block, scan_blocks
from kdprune.engine.structure import _set_submodule, register_edit

__all__ = ["RemoveBlock", "ShortcutOnly", "checked_parts", "residual_blocks", "residual_parts"]


def residual_blocks(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """Names of the model's residual blocks: its ``residual_blocks()``, else discovered by tracing
    on ``example_input`` (ValueError when there is none, or no block is found, saying why)."""
    fn = getattr(model, "residual_blocks", None)
    if callable(fn):
        return list(fn())
    if example_input is None:
        raise ValueError(f"{type(model).__name__} does not list its residual blocks (no residual_blocks() "
                         "method) and no example input was given to discover them: pass one, or "
                         "implement the block protocol, see kdprune.engine.blocks")
    scan = scan_blocks(model, example_input)
    if not scan.found:
        raise ValueError(scan.why_none(model))
    return list(scan.found)


def residual_parts(block: nn.Module, name: str = "block") -> dict[str, Any]:
    """The block's pre-shortcut, shortcut and post-addition module names (ValueError naming what
    is missing, or that the block has no residual connection)."""
    fn = getattr(block, "residual_parts", None)
    if not callable(fn):
        raise ValueError(f"{name} ({type(block).__name__}) has no residual_parts(): kdprune cannot tell its "
                         "shortcut from its branch, so it cannot be removed")
    parts = fn()
    if parts is None:
        raise ValueError(f"{name} ({type(block).__name__}) has no residual connection: removing it would "
                         "change what the next layer receives")
    return checked_parts(block, parts, name)


def checked_parts(block: nn.Module, parts: dict[str, Any], name: str = "block") -> dict[str, Any]:
    """``parts`` normalised (pre/shortcut/post, and post_fn when set), ValueError naming a module
    the block lacks or an unknown post function."""
    out = {"pre": list(parts.get("pre", [])), "shortcut": parts.get("shortcut"), "post": parts.get("post")}
    for sub in [*out["pre"], out["shortcut"], out["post"]]:
        if sub is not None and not isinstance(getattr(block, sub, None), nn.Module):
            raise ValueError(f"{name}'s residual parts name {sub!r}, which the block does not have")
    fn = parts.get("post_fn")
    if fn is not None:
        if fn not in POST_FUNCTIONS or out["post"] is not None:
            raise ValueError(f"{name}'s residual parts: post_fn {fn!r} must be one of "
                             f"{sorted(POST_FUNCTIONS)} and come without a post module")
        out["post_fn"] = fn
    return out


class ShortcutOnly(nn.Module):
    """A removed residual block: ``post(shortcut(pre(x)))``, under the block's own submodule names
    so that their weights keep their state_dict keys."""

    def __init__(self, block: nn.Module, parts: dict[str, Any]) -> None:
        super().__init__()
        self.order = [*parts["pre"], *[n for n in (parts["shortcut"], parts["post"]) if n is not None]]
        for n in self.order:
            self.add_module(n, getattr(block, n))
        fn = parts.get("post_fn")
        if fn is not None:
            if "post_fn" in self.order:
                raise ValueError("ShortcutOnly: the block has a submodule named 'post_fn', which would "
                                 "collide with its post activation")
            self.post_fn = POST_FUNCTIONS[fn]()  # stateless: adds no state_dict key
            self.order.append("post_fn")
        # The block ran its post activation on a fresh sum; here, without pre or shortcut modules,
        # it would get the block's input: an in-place one (shared nn.ReLU(inplace=True)) would
        # overwrite a tensor autograd or the caller still needs, so it gets a copy.
        first = getattr(self, self.order[0]) if self.order else None
        self.copy_input = not parts["pre"] and parts["shortcut"] is None and bool(getattr(first, "inplace", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input through the kept modules, in order (identity when there are none)."""
        if self.copy_input:
            x = x.clone()
        for n in self.order:
            x = getattr(self, n)(x)
        return x


@register_edit("remove_block")
class RemoveBlock:
    """Replace a residual block by its shortcut (and post-addition activation)."""

    @staticmethod
    def apply(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None) -> None:
        """Swap ``edit["module"]`` for ``ShortcutOnly`` built from the edit's ``"parts"``, else the
        block's protocol, else discovery; discovered parts are written into ``edit["parts"]`` so
        the recorded edit replays without discovering again."""
        name = edit.get("module")
        if not isinstance(name, str) or not name:
            raise ValueError(f"remove_block edit needs a 'module' name, got {edit!r}")
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"remove_block: module {name!r} not found in {type(model).__name__}") from None
        if edit.get("parts") is not None:
            parts = checked_parts(block, edit["parts"], name)
        elif callable(getattr(block, "residual_parts", None)):
            parts = residual_parts(block, name)
        elif example_input is None:
            raise ValueError(f"{name} ({type(block).__name__}) has no residual_parts() and no example input "
                             "was given to discover them: kdprune cannot tell its shortcut from its branch, "
                             "so it cannot be removed")
        else:
            parts = edit["parts"] = discover_block(model, name, example_input)
        _set_submodule(model, name, ShortcutOnly(block, parts))
