"""Soft channel masks / trainable gates for training-time pruning, and their conversion to
physical removal.

``attach_masks`` multiplies, per group, every *site* of the group (the output of the BN after a
conv, or of a conv/linear without BN; see ``ChannelGroup.sites``) by a per-channel vector: a
buffer (hard 0/1 masks) or an ``nn.Parameter`` (trainable gates, e.g. for Network-Slimming-like
sparsity, Liu et al. 2017). The ``MaskSet`` is registered on the model as ``model.kdprune_masks``
so gates/masks are in ``model.state_dict()`` and resumable training restores them.

Equivalence used throughout: zeroing a group's channel at all its sites makes it contribute
nothing downstream, which is exactly what removing it (with DepGraph) does.
"""
from __future__ import annotations

import enum
import re
from typing import Sequence

import torch
from torch import nn

from kdprune.engine.allocate import PruningPlan
from kdprune.engine.graph import ChannelGroup, is_placer
from kdprune.registry import check_choice

__all__ = ["MaskSet", "MaskSlots", "MaskKind", "attach_masks", "masks_to_plan", "fold_gates_into_bn",
           "zero_channels", "MASKS_ATTR"]

MASKS_ATTR = "kdprune_masks"


class MaskKind(enum.Enum):
    """What a MaskSet holds: fixed 0/1 masks (buffers) or trainable gates (parameters)."""

    MASK = "mask"
    GATE = "gate"


def _key(root: str) -> str:
    # Parameter/buffer names may not contain dots; keep them readable and unique.
    return "g_" + re.sub(r"[^0-9a-zA-Z_]", "_", root.replace(".", "__"))


class _SiteHook:
    """Forward hook multiplying a site's output by the composed per-channel vector."""

    def __init__(self, masks: "MaskSet", site: str) -> None:
        self.masks, self.site = masks, site

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not self.masks.enabled:
            return None
        vec = self.masks.site_vector(self.site, out.shape[1], out.device, out.dtype)
        if is_placer(module):  # a placer has no weight to scale: it only keeps or drops a channel
            vec = (vec != 0).to(out.dtype)
        return out * vec.view(1, -1, *([1] * (out.dim() - 2)))


class MaskSet(nn.Module):
    """Per-group channel masks (buffers) or gates (parameters) applied by forward hooks."""

    def __init__(self, groups: Sequence[ChannelGroup], kind: MaskKind = MaskKind.MASK, init: float = 1.0) -> None:
        super().__init__()
        check_choice(kind, MaskKind, "kind")
        self.kind, self.enabled = kind, True
        self.groups = {g.root: g for g in groups}
        # Plain attribute, not a submodule (that would make a module cycle); deepcopy remaps it.
        object.__setattr__(self, "_model", None)
        for g in groups:
            value = torch.full((g.channels,), float(init))
            if kind is MaskKind.GATE:
                self.register_parameter(_key(g.root), nn.Parameter(value))
            else:
                self.register_buffer(_key(g.root), value)
        # site -> [(group root, local idxs, root idxs)] so sites shared by several groups (e.g. a
        # BN after a concat) compose every group's slice.
        self.site_map: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for g in groups:
            for site in g.sites:
                m = g.member(site)
                self.site_map.setdefault(site, []).append(
                    (g.root, torch.tensor(m.idxs, dtype=torch.long),
                     torch.tensor(m.root_idxs, dtype=torch.long)))

    def _group(self, group: ChannelGroup | str) -> ChannelGroup:
        root = group.root if isinstance(group, ChannelGroup) else group
        if root not in self.groups:
            raise KeyError(f"no mask for group {root!r}")
        return self.groups[root]

    def value(self, group: ChannelGroup | str) -> torch.Tensor:
        """The mask/gate tensor of ``group`` (root channel order; live, not a copy)."""
        return getattr(self, _key(self._group(group).root))

    def parameter_name(self, group: ChannelGroup | str) -> str:
        """The name of ``group``'s gate or mask in the model's ``named_parameters``/``state_dict``."""
        return f"{MASKS_ATTR}.{_key(self._group(group).root)}"

    def set_mask(self, group: ChannelGroup | str, mask: torch.Tensor | Sequence[bool]) -> None:
        """Set a group's values from a bool keep-mask (True = keep) or float tensor."""
        g = self._group(group)
        mask = torch.as_tensor(mask)
        if mask.numel() != g.channels:
            raise ValueError(f"mask for {g.root!r} has {mask.numel()} entries, group has {g.channels}")
        with torch.no_grad():
            self.value(g).copy_(mask.reshape(-1).to(self.value(g)))

    def site_vector(self, site: str, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The multiplier for one site's output (ones where no group covers a channel)."""
        vec = torch.ones(channels, device=device, dtype=dtype)
        for root, local, rootidx in self.site_map[site]:
            values = self.value(root).to(device=device, dtype=dtype)[rootidx.to(device)]
            vec = vec.index_put((local.to(device),), values)  # out of place: keeps gate grads
        return vec

    @torch.no_grad()
    def site_scale(self) -> dict[str, torch.Tensor]:
        """Per group (root channel order), the scale of the affine op each gate multiplies: over the
        group's sites, the L2 norm of a BatchNorm's |gamma| or a conv/linear filter's norm (1 where
        no site scales a channel, e.g. a placer). The gate alone is blind to it: a BatchNorm-normalised
        channel with gamma = beta = 0 is dead whatever its gate."""
        sq = {r: torch.zeros(g.channels, dtype=torch.float64) for r, g in self.groups.items()}
        seen = {r: torch.zeros(g.channels, dtype=torch.bool) for r, g in self.groups.items()}
        for site, entries in self.site_map.items():
            per = _channel_scale(self._model.get_submodule(site))
            if per is None:
                continue
            for root, local, rootidx in entries:
                sq[root].index_add_(0, rootidx, per[local].double() ** 2)
                seen[root][rootidx] = True
        return {r: torch.where(seen[r], s.sqrt(), torch.ones_like(s)) for r, s in sq.items()}

    def attach(self, model: nn.Module) -> "MaskSet":
        """Register hooks on every site and the MaskSet as ``model.kdprune_masks``."""
        if getattr(model, MASKS_ATTR, None) is not None:
            raise RuntimeError("model already has a MaskSet attached; remove() it first")
        for site in self.site_map:
            model.get_submodule(site).register_forward_hook(_SiteHook(self, site))
        model.add_module(MASKS_ATTR, self)
        object.__setattr__(self, "_model", model)
        return self

    def remove(self) -> None:
        """Remove the hooks and detach from the model (values are kept on this object)."""
        model = self._model
        if model is None:
            return
        # Find our hooks by identity rather than keeping handles: handles do not survive
        # copy.deepcopy of the model, the hook objects (and this MaskSet) do.
        for m in model.modules():
            for hid, hook in list(m._forward_hooks.items()):
                if isinstance(hook, _SiteHook) and hook.masks is self:
                    del m._forward_hooks[hid]
        if getattr(model, MASKS_ATTR, None) is self:
            delattr(model, MASKS_ATTR)
        object.__setattr__(self, "_model", None)

    def forward(self, *args, **kwargs):  # a container, never called
        raise RuntimeError("MaskSet is applied through hooks; call the model instead")


class MaskSlots(MaskSet):
    """``slots`` gate sets over one model (nested sub-models sharing its weights, Cascade): the
    hooks apply row ``slot`` of a (slots, channels) parameter per group, so a forward under slot k
    is sub-model k and one backward through several slots' forwards gives each row the gradient
    of its own forwards only. ``value`` / ``set_mask`` / folding act on the current slot."""

    def __init__(self, groups: Sequence[ChannelGroup], slots: int, init: float = 1.0) -> None:
        super().__init__(groups, MaskKind.GATE, init)
        if slots < 1:
            raise ValueError(f"MaskSlots needs at least one slot, got {slots}")
        for g in groups:
            self.register_parameter(_key(g.root), nn.Parameter(torch.full((slots, g.channels), float(init))))
        self.slots, self.slot = slots, 0

    def value(self, group: ChannelGroup | str) -> torch.Tensor:
        """The current slot's row of ``group``'s values (live view)."""
        return super().value(group)[self.slot]

    def rows(self, group: ChannelGroup | str) -> torch.Tensor:
        """Every slot's values of ``group``: a (slots, channels) parameter."""
        return super().value(group)


def attach_masks(model: nn.Module, groups: Sequence[ChannelGroup], kind: MaskKind = MaskKind.MASK,
                 init: float = 1.0) -> MaskSet:
    """Attach per-channel masks (``MaskKind.MASK``, buffers) or trainable gates (``MaskKind.GATE``,
    parameters) to every group's sites; returns the ``MaskSet`` (also ``model.kdprune_masks``)."""
    p = next(model.parameters(), None)
    masks = MaskSet(groups, kind, init)
    if p is not None:
        masks.to(p.device)
    return masks.attach(model)


def masks_to_plan(masks: MaskSet, threshold: float = 0.0) -> PruningPlan:
    """Channels whose |mask/gate| <= threshold become removals (every group keeps >= 1 channel)."""
    removals = {}
    for root, g in masks.groups.items():
        drop = (masks.value(root).detach().abs() <= threshold).nonzero().flatten().tolist()
        if len(drop) >= g.channels:
            raise ValueError(f"all {g.channels} channels of group {root!r} are masked; keep at least one")
        for m in g.producers:
            if m.root_idxs and set(m.root_idxs) <= set(drop):
                raise ValueError(f"all channels of {m.name!r} (part of group {root!r}) are masked; "
                                 "a layer cannot be pruned to zero width, unmask one of them")
        if drop:
            removals[root] = drop
    return PruningPlan(removals)


def _channel_scale(module: nn.Module) -> torch.Tensor | None:
    """|gamma| of an affine norm layer, the per-output-channel filter norm of a conv/linear, on the
    CPU; None for a layer with no per-channel weight (a placer, a non-affine norm)."""
    w = getattr(module, "weight", None)
    if is_placer(module) or w is None:
        return None
    w = w.detach().float().cpu()
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return w.abs()
    out_dim = 1 if getattr(module, "transposed", False) else 0
    return w.transpose(0, out_dim).flatten(1).norm(dim=1)


def _scale_site(module: nn.Module, vec: torch.Tensor, name: str) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.GroupNorm):
        if module.weight is None:
            raise ValueError(f"cannot fold gates into non-affine norm layer {name!r}")
        module.weight.mul_(vec)
        module.bias.mul_(vec)
        return
    w = module.weight
    shape = [1] * w.dim()
    out_dim = 1 if getattr(module, "transposed", False) else 0
    shape[out_dim] = -1
    w.mul_(vec.view(shape))
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(vec)


@torch.no_grad()
def fold_gates_into_bn(model: nn.Module, masks: MaskSet) -> None:
    """Fold gates into the site layers (BN gamma and beta, or conv/linear weight and bias) so the
    ungated model equals the gated one, then remove the MaskSet from the model."""
    for site in masks.site_map:
        module = model.get_submodule(site)
        if is_placer(module):
            _fold_placer(module, masks, site)
            continue
        p = module.weight
        vec = masks.site_vector(site, _out_channels(module), p.device, p.dtype)
        _scale_site(module, vec, site)
    masks.remove()


def _fold_placer(module: nn.Module, masks: MaskSet, site: str) -> None:
    """Zeroed gates at a channel placer (option-A shortcut) drop those placements, which is what
    the hook's hard keep/drop computed; other gate values never scale a placer."""
    width = module.kdprune_channels()[1]
    vec = masks.site_vector(site, width, torch.device("cpu"), torch.float32)
    zero = (vec == 0).nonzero().flatten().tolist()
    if zero:
        module.kdprune_zero_outputs(zero)


def _out_channels(module: nn.Module) -> int:
    for attr in ("num_features", "out_channels", "out_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise ValueError(f"cannot tell the output width of {type(module).__name__}")


@torch.no_grad()
def zero_channels(model: nn.Module, groups: Sequence[ChannelGroup], plan: PruningPlan) -> None:
    """Zero the planned channels at every site (BN gamma/beta or conv weight/bias) in place: the
    dense reference that a physically pruned model must match in eval mode."""
    by_root = {g.root: g for g in groups}
    masks = MaskSet([by_root[r] for r in plan], MaskKind.MASK)
    for root, idxs in plan.items():
        keep = torch.ones(by_root[root].channels, dtype=torch.bool)
        keep[list(idxs)] = False
        masks.set_mask(root, keep)
    fold_gates_into_bn(model, masks)
