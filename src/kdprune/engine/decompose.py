"""Low-rank decomposition edits for EDP (Ruan et al., TNNLS 2020, "EDP: An Efficient Decomposition
and Pruning Scheme for Convolutional Neural Network Compression").

``decompose_conv`` replaces a conv W (k x k, C_in -> C_out) by ``DecomposedConv``: a basis conv B
(k x k, C_in -> r, no bias) followed by a 1x1 coefficient conv A (r -> C_out, with W's bias),
initialised B = W, A = I (r = C_out), so the function is unchanged. ``merge_conv`` folds the pair
back into one conv W'[o, i] = sum_r A[o, r] B[r, i] in closed form.

Both halves are ordinary nn.Conv2d, so DepGraph (``kdprune.engine.graph``) sees a plain conv chain:
the group rooted at ``<name>.basis`` is the rank (B's outputs + A's inputs) and the group of
``<name>.coeff`` holds the original conv's output channels; ``prune_channels`` removes either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdprune.engine.prune import MaskedModelError
from kdprune.engine.structure import _set_submodule, register_edit
from kdprune.utils.forward import probe_forward

__all__ = ["DecomposedConv", "DecomposeConv", "MergeConv", "RankCost", "decomposition_cost",
           "merge_is_cheaper", "decomposed_convs"]


class DecomposedConv(nn.Module):
    """EDP's compression-aware block (Ruan et al., TNNLS 2020): ``coeff(basis(x))`` with ``basis``
    a k x k conv C_in -> rank (no bias) and ``coeff`` a 1x1 conv rank -> C_out (the bias)."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size: Any,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.basis = nn.Conv2d(in_channels, rank, kernel_size, stride, padding, dilation, groups=1,
                               bias=False, padding_mode=padding_mode, **kw)
        self.coeff = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, name: str = "conv") -> DecomposedConv:
        """The block equal to ``conv`` (basis = its weight, coeff = identity, its bias), EDP init."""
        _check_decomposable(conv, name)
        w, c = conv.weight, conv.out_channels
        block = cls(conv.in_channels, c, c, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.bias is not None, conv.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            block.basis.weight.copy_(w)
            block.coeff.weight.copy_(torch.eye(c, device=w.device, dtype=w.dtype).view(c, c, 1, 1))
            if conv.bias is not None:
                block.coeff.bias.copy_(conv.bias)
        # A frozen conv stays frozen once decomposed.
        block.basis.weight.requires_grad_(w.requires_grad)
        return block.train(conv.training)

    @property
    def rank(self) -> int:
        """Number of basis filters r (basis outputs = coeff inputs)."""
        return self.basis.out_channels

    @property
    def in_channels(self) -> int:
        """Input channels C_in (those of the original conv)."""
        return self.basis.in_channels

    @property
    def out_channels(self) -> int:
        """Output channels C_out (those of the original conv)."""
        return self.coeff.out_channels

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Closed-form W'[o, i] = sum_r A[o, r] B[r, i] (computed in float64) and coeff's bias."""
        a = self.coeff.weight.detach().flatten(1).double()
        b = self.basis.weight.detach().double()
        w = torch.einsum("or,rikl->oikl", a, b).to(self.basis.weight.dtype)
        bias = self.coeff.bias
        return w, None if bias is None else bias.detach().clone()

    def to_conv(self) -> nn.Conv2d:
        """One nn.Conv2d computing the same function (``merged_weight``)."""
        b = self.basis
        conv = nn.Conv2d(b.in_channels, self.out_channels, b.kernel_size, b.stride, b.padding, b.dilation,
                         bias=self.coeff.bias is not None, padding_mode=b.padding_mode,
                         device=b.weight.device, dtype=b.weight.dtype)
        w, bias = self.merged_weight()
        with torch.no_grad():
            conv.weight.copy_(w)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The coefficient 1x1 conv applied to the basis responses."""
        return self.coeff(self.basis(x))


def _check_decomposable(module: nn.Module, name: str) -> None:
    if isinstance(module, DecomposedConv):
        raise ValueError(f"decompose_conv: {name!r} is already a DecomposedConv")
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"decompose_conv: {name!r} is a {type(module).__name__}, not an nn.Conv2d; "
                         "only 2-d convolutions can be decomposed")
    # A subclass with its own forward (weight standardisation, quantisation...) would not be
    # reproduced by the two plain convs.
    cls = type(module)
    if cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward:
        raise ValueError(f"decompose_conv: {name!r} ({type(module).__name__}) overrides the conv forward, "
                         "which a basis + coefficient pair of plain convs would not reproduce")
    if module.groups != 1:
        raise ValueError(f"decompose_conv: {name!r} is a grouped conv (groups={module.groups}); only "
                         "groups=1 convs can be decomposed (a shared basis would mix the groups)")


def _edit_module(model: nn.Module, edit: dict[str, Any], op: str) -> tuple[str, nn.Module]:
    name = edit.get("module")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{op} edit needs a 'module' name, got {edit!r}")
    if getattr(model, "kdprune_masks", None) is not None:
        # Mask hooks sit on the old module objects and would silently stop applying.
        raise MaskedModelError(f"{op}: the model has soft masks attached; fold_gates_into_bn / "
                               "MaskSet.remove() them first")
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{op}: module {name!r} not found in {type(model).__name__}") from None


def _module_input(model: nn.Module, name: str, example_input: torch.Tensor, op: str) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if not seen and args and isinstance(args[0], torch.Tensor):
            seen.append(args[0].detach())

    probe_forward(model, example_input, {name: hook})
    if not seen:
        raise ValueError(f"{op}: {name!r} did not run on the example input")
    return seen[0]


def _swap_checked(model: nn.Module, name: str, new: nn.Module, example_input: torch.Tensor | None,
                  op: str) -> None:
    """Put ``new`` at ``name``; with an example input, first check that it computes what the old
    module did on the input that module actually receives (restoring the old one otherwise)."""
    old = model.get_submodule(name)
    if example_input is None:
        _set_submodule(model, name, new)
        return
    x = _module_input(model, name, example_input, op)
    with torch.no_grad():
        ref, got = old(x), new(x)
    # Float rounding of the merged product scales with the dtype and the outputs' size.
    tol = torch.finfo(ref.dtype).eps ** 0.5 if ref.is_floating_point() else 0.0
    scale = 1.0 + (ref.abs().max().item() if ref.numel() else 0.0)
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=tol, atol=tol * scale):
        raise ValueError(f"{op}: the replacement of {name!r} does not reproduce its output on the "
                         "example input; the module was left unchanged")
    _set_submodule(model, name, new)


@register_edit("decompose_conv")
class DecomposeConv:
    """Replace an nn.Conv2d by the equivalent ``DecomposedConv`` (EDP, Ruan et al., TNNLS 2020)."""

    @staticmethod
    def apply(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None) -> None:
        """Swap conv ``edit["module"]`` for ``DecomposedConv.from_conv`` (groups == 1 only)."""
        name, conv = _edit_module(model, edit, "decompose_conv")
        _swap_checked(model, name, DecomposedConv.from_conv(conv, name), example_input, "decompose_conv")


@register_edit("merge_conv")
class MergeConv:
    """Replace a ``DecomposedConv`` by one conv with the closed-form weight A B (EDP merging)."""

    @staticmethod
    def apply(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None) -> None:
        """Swap DecomposedConv ``edit["module"]`` for its ``to_conv()``."""
        name, block = _edit_module(model, edit, "merge_conv")
        if not isinstance(block, DecomposedConv):
            raise ValueError(f"merge_conv: {name!r} is a {type(block).__name__}, not a DecomposedConv "
                             "(only a decompose_conv block can be merged)")
        _swap_checked(model, name, block.to_conv(), example_input, "merge_conv")


@dataclass(frozen=True)
class RankCost:
    """Multiply-accumulates and weights of a DecomposedConv kept as two layers vs merged."""

    rank: int
    decomposed_macs: int
    merged_macs: int
    decomposed_params: int
    merged_params: int

    @property
    def merge_is_cheaper(self) -> bool:
        """EDP's rule (Ruan et al., TNNLS 2020): merge when the two layers cost at least one."""
        return self.decomposed_macs >= self.merged_macs


def decomposition_cost(module: DecomposedConv, output_hw: tuple[int, int] = (1, 1)) -> RankCost:
    """MACs (for an ``output_hw`` output map; per output position by default) and weights of the
    block as basis + coeff, r (k^2 C_in + C_out), vs merged, k^2 C_in C_out (biases equal, left out)."""
    if not isinstance(module, DecomposedConv):
        raise ValueError(f"decomposition_cost needs a DecomposedConv, got {type(module).__name__}")
    kk = module.basis.kernel_size[0] * module.basis.kernel_size[1]
    r, cin, cout = module.rank, module.in_channels, module.out_channels
    two, one = r * (kk * cin + cout), kk * cin * cout
    # coeff is 1x1 / stride 1, so both forms produce the same output map: the area cancels in the
    # comparison, and the parameter counts equal the per-position MACs.
    hw = int(output_hw[0]) * int(output_hw[1])
    return RankCost(rank=r, decomposed_macs=two * hw, merged_macs=one * hw,
                    decomposed_params=two, merged_params=one)


def merge_is_cheaper(module: DecomposedConv) -> bool:
    """EDP's merge rule (Ruan et al., TNNLS 2020): r (k^2 C_in + C_out) >= k^2 C_in C_out. The
    output area cancels, so the answer is the same for FLOPs and params at any input size."""
    return decomposition_cost(module).merge_is_cheaper


def decomposed_convs(model: nn.Module) -> list[str]:
    """Names of the model's DecomposedConv blocks, in ``named_modules`` order."""
    return [n for n, m in model.named_modules() if isinstance(m, DecomposedConv)]
