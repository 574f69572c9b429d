"""Residual blocks for block pruning: the block protocol and the ``remove_block`` edit.

Block protocol (models implement it; the engine imports no model): a residual block has
``residual_parts() -> {"shortcut": name, "post": name | None}``, the submodule whose output is
added to the branch's, and the module applied after the addition (e.g. the second ReLU of a
post-activation BasicBlock); a model lists its blocks with ``residual_blocks() -> [names]``.
Removing a block keeps ``post(shortcut(x))``: exactly the block with its branch output zeroed,
which is what a zero soft mask on the branch computes (OED's removal)."""
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


def residual_parts(block: nn.Module, name: str = "block") -> dict[str, str | None]:
    """The block's shortcut and post-addition module names (ValueError naming what is missing)."""
    fn = getattr(block, "residual_parts", None)
    if not callable(fn):
        raise ValueError(f"{name} ({type(block).__name__}) has no residual_parts(): kdprune cannot tell its "
                         "shortcut from its branch, so it cannot be removed")
    parts = dict(fn())
    for key in ("shortcut", "post"):
        sub = parts.get(key)
        if sub is not None and not hasattr(block, sub):
            raise ValueError(f"{name}.residual_parts() names {key}={sub!r}, which the block does not have")
    if parts.get("shortcut") is None:
        raise ValueError(f"{name}.residual_parts() gives no shortcut")
    return parts


class ShortcutOnly(nn.Module):
    """A removed residual block: ``post(shortcut(x))``, under the block's own submodule names so
    the shortcut's weights keep their state_dict keys."""

    def __init__(self, block: nn.Module, parts: dict[str, str | None]) -> None:
        super().__init__()
        self.shortcut_name, self.post_name = parts["shortcut"], parts.get("post")
        self.add_module(self.shortcut_name, getattr(block, self.shortcut_name))
        if self.post_name is not None:
            self.add_module(self.post_name, getattr(block, self.post_name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut's output, through the post-addition module if any."""
        out = getattr(self, self.shortcut_name)(x)
        return getattr(self, self.post_name)(out) if self.post_name is not None else out


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
