"""Scalar soft masks on residual branches (OED, Wang et al. IEEE Access 2019): ``post(shortcut(x)
+ m_b * branch(x))``, applied by a forward hook on the module that ends each branch, then folded
into that module (m_b > 0) or the block removed (m_b = 0, ``remove_block``: the same function).

The mask values live in one tensor owned by the caller (a ``(blocks,)`` view of a parameter), so a
method can keep several masked replicas and train the masks with its own proximal step."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from kdprune.engine.blocks import residual_blocks
from kdprune.engine.discover import branch_end
from kdprune.engine.structure import apply_edit

__all__ = ["BlockMaskHooks", "mask_sites", "attach_block_masks", "fold_block_masks"]

_SCALABLE = (nn.modules.batchnorm._BatchNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.GroupNorm,
             nn.LayerNorm)


def mask_sites(model: nn.Module, example_input: torch.Tensor, blocks: Sequence[str] | None = None
               ) -> dict[str, str]:
    """block name -> the module ending its residual branch, for ``blocks`` (default: every
    residual block, by protocol or discovery); ValueError naming a block that has none."""
    names = list(blocks) if blocks is not None else residual_blocks(model, example_input)
    if not names:
        raise ValueError(f"{type(model).__name__} has no residual block to mask")
    return {b: branch_end(model, b, example_input) for b in names}


class BlockMaskHooks:
    """The forward hooks that multiply each branch end's output by its mask value."""

    def __init__(self, model: nn.Module, sites: dict[str, str], values: Callable[[], Tensor]) -> None:
        self.sites, self.values = dict(sites), values
        self.handles = [model.get_submodule(end).register_forward_hook(self._hook(i))
                        for i, end in enumerate(self.sites.values())]

    def _hook(self, i: int) -> Callable[..., Tensor]:
        def scale(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return out * self.values()[i].to(out.dtype)
        return scale

    def remove(self) -> None:
        """Detach every hook (the model computes its unmasked function again)."""
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_block_masks(model: nn.Module, sites: dict[str, str], values: Callable[[], Tensor]) -> BlockMaskHooks:
    """Hook ``values()[i]`` (a scalar per block, in ``sites`` order) onto each branch end."""
    return BlockMaskHooks(model, sites, values)


def _innermost_scalable(module: nn.Module, name: str) -> nn.Module:
    """The module whose weight and bias carry the mask: the branch end itself, or the last child
    of a Sequential end (what follows it must be positively homogeneous: ReLU, identity, pooling)."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    if not isinstance(module, _SCALABLE) or getattr(module, "weight", None) is None:
        raise ValueError(f"branch end {name} ({type(module).__name__}) has no affine weight to fold a block "
                         "mask into; its mask can only be 0 (remove the block) or 1")
    return module


@torch.no_grad()
def fold_block_masks(model: nn.Module, sites: dict[str, str], values: Tensor, example_input: torch.Tensor
                     ) -> list[str]:
    """Fold each mask > 0 into its branch end (weight and bias times m_b: exact) and remove the
    blocks whose mask is 0 (``remove_block``, recorded in the structure log); returns those.
    Call after the hooks are removed."""
    values = values.detach().cpu()
    if values.shape != (len(sites),) or bool((values < 0).any()):
        raise ValueError(f"need one non-negative mask per block ({len(sites)}), got {tuple(values.shape)}")
    removed = []
    for (block, end), v in zip(sites.items(), values.tolist()):
        if v == 0.0:
            removed.append(block)
        elif v != 1.0:
            mod = _innermost_scalable(model.get_submodule(end), end)
            mod.weight.mul_(v)
            if getattr(mod, "bias", None) is not None:
                mod.bias.mul_(v)
    for block in removed:  # after folding: removal needs the model's real forward
        apply_edit(model, {"op": "remove_block", "module": block}, example_input)
    return removed
