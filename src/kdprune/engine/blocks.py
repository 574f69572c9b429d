"""Residual blocks for block pruning: the block protocol and the ``remove_block`` edit.

Block protocol (models implement it; the engine imports no model): a residual block has
``residual_parts() -> {"pre": [names], "shortcut": name | None, "post": name | None}`` (or
None when it has no residual connection): the modules applied to the input before the shortcut
(a pre-activation block's BN-ReLU when its projection reads the activated input), the shortcut
module (None: identity), and the module applied after the addition (e.g. the second ReLU of a
post-activation BasicBlock); a model lists its blocks with ``residual_blocks() -> [names]``.
Removing a block keeps ``post(shortcut(pre(x)))``: exactly the block with its branch output
zeroed, which is what a zero soft mask on the branch computes (OED's removal)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdprune.engine.structure import _set_submodule, register_edit

__all__ = ["ShortcutOnly", "RemoveBlock", "residual_blocks", "residual_parts"]


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the model's residual blocks (its ``residual_blocks()``), in forward order."""
    fn = getattr(model, "residual_blocks", None)
    if not callable(fn):
        raise ValueError(f"{type(model).__name__} does not list its residual blocks (no residual_blocks() "
                         "method): block pruning needs the block protocol, see kdprune.engine.blocks")
    return list(fn())


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
    parts = {"pre": list(parts.get("pre", [])), "shortcut": parts.get("shortcut"), "post": parts.get("post")}
    for sub in [*parts["pre"], parts["shortcut"], parts["post"]]:
        if sub is not None and not hasattr(block, sub):
            raise ValueError(f"{name}.residual_parts() names {sub!r}, which the block does not have")
    return parts


class ShortcutOnly(nn.Module):
    """A removed residual block: ``post(shortcut(pre(x)))``, under the block's own submodule names
    so that their weights keep their state_dict keys."""

    def __init__(self, block: nn.Module, parts: dict[str, Any]) -> None:
        super().__init__()
        self.order = [*parts["pre"], *[n for n in (parts["shortcut"], parts["post"]) if n is not None]]
        for n in self.order:
            self.add_module(n, getattr(block, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input through the kept modules, in order (identity when there are none)."""
        for n in self.order:
            x = getattr(self, n)(x)
        return x


@register_edit("remove_block")
class RemoveBlock:
    """Replace a residual block by its shortcut (and post-addition activation)."""

    @staticmethod
    def apply(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None) -> None:
        """Swap ``edit["module"]`` for ``ShortcutOnly`` built from the block's own parts."""
        name = edit.get("module")
        if not isinstance(name, str) or not name:
            raise ValueError(f"remove_block edit needs a 'module' name, got {edit!r}")
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"remove_block: module {name!r} not found in {type(model).__name__}") from None
        _set_submodule(model, name, ShortcutOnly(block, residual_parts(block, name)))
