"""Intermediate-feature capture and feature hints (FitNets, Romero et al. 2015)."""
from __future__ import annotations

import difflib
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdprune.distill.teachers import as_normal  # features captured from a FrozenTeacher

__all__ = ["FeatureTap", "HintLoss"]


def _resolve(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists close and available names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        available = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise KeyError(
            f"no submodule named {name!r} in {type(model).__name__}.{hint} Available: {shown}"
        ) from None


class FeatureTap:
    """Forward hooks that record the outputs of named submodules (feature taps for FitNets).

    ``tap.features`` maps each requested name to the output of its most recent forward. The
    dict is cleared at the start of every forward of ``model`` (via a pre-hook on the root),
    so it never mixes tensors from two different batches. Use as a context manager to make
    sure hooks are removed::

        with FeatureTap(model, ["layer2", "layer3"]) as tap:
            logits = model(x)
            f2, f3 = tap.as_list()

    Under DDP pass the inner module (``ddp.module``) so names carry no ``module.`` prefix.
    Outputs are stored as-is (with grad) unless ``detach=True``.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], detach: bool = False) -> None:
        if isinstance(names, str):
            names = [names]
        if len(names) == 0:
            raise ValueError("FeatureTap needs at least one submodule name")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate names in {list(names)}")
        self.model = model
        self.names: list[str] = list(names)
        self.detach = detach
        self._store: dict[str, Tensor] = {}
        modules = [_resolve(model, n) for n in self.names]  # validate all before hooking any
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._on_root_pre)]
        for name, module in zip(self.names, modules):
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _on_root_pre(self, module: nn.Module, args: object) -> None:
        self._store.clear()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"FeatureTap: submodule {name!r} returned {type(output).__name__}, expected a Tensor"
                )
            # A module called twice in one forward (weight sharing) keeps its last output.
            self._store[name] = output.detach() if self.detach else output

        return hook

    @property
    def features(self) -> dict[str, Tensor]:
        """Captured outputs of the last forward, ordered as ``names``."""
        return {n: as_normal(self._store[n]) for n in self.names if n in self._store}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._store:
            raise KeyError(f"no captured output for {name!r} (was the model run? known: {self.names})")
        return as_normal(self._store[name])

    def as_list(self) -> list[Tensor]:
        """Captured outputs in ``names`` order; raises if some module did not run."""
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(f"submodules {missing} produced no output in the last forward")
        return [as_normal(self._store[n]) for n in self.names]

    def clear(self) -> None:
        """Drop captured tensors (frees activations kept alive by the tap)."""
        self._store.clear()

    def remove(self) -> None:
        """Remove all hooks and captured tensors; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _as_4d(feat: Tensor, role: str, index: int) -> Tensor:
    if feat.dim() == 2:  # pooled (B, C) features: treat as 1x1 maps
        return feat[:, :, None, None]
    if feat.dim() != 4:
        raise ValueError(f"{role} feature {index} must be (B,C,H,W) or (B,C), got {tuple(feat.shape)}")
    return feat


def _match_spatial(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    # Pool the larger map down (per dimension) rather than upsampling the smaller one: average
    # pooling invents no detail and commutes with the 1x1 adapter, so order does not matter.
    size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
    if tuple(s.shape[-2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[-2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


class HintLoss(nn.Module):
    """FitNets hint loss (Romero et al. 2015): MSE(adapter(f_s), f_t), averaged over pairs.

    One 1x1 convolution per (student, teacher) pair maps student channels to teacher channels.
    The adapters are trainable: put ``hint.parameters()`` in the optimiser. ``init="identity"``
    starts each adapter as a (rectangular) identity with zero bias, so equal features give 0.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        init: Literal["default", "identity"] = "default",
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels) or len(student_channels) == 0:
            raise ValueError(
                f"need one teacher channel count per student one, got {list(student_channels)} "
                f"and {list(teacher_channels)}"
            )
        self.adapters = nn.ModuleList(
            nn.Conv2d(int(cs), int(ct), kernel_size=1) for cs, ct in zip(student_channels, teacher_channels)
        )
        if init == "identity":
            self.reset_identity()
        elif init != "default":
            raise ValueError(f"unknown init {init!r}; expected 'default' or 'identity'")

    def reset_identity(self) -> None:
        """Set every adapter to the identity on the shared channels (eye weight, zero bias)."""
        with torch.no_grad():
            for conv in self.adapters:
                nn.init.eye_(conv.weight.view(conv.out_channels, conv.in_channels))
                conv.bias.zero_()

    def forward(
        self,
        student_feats: Sequence[Tensor] | Mapping[str, Tensor],
        teacher_feats: Sequence[Tensor] | Mapping[str, Tensor],
    ) -> Tensor:
        """Mean over pairs of MSE(adapter_i(student_i), teacher_i.detach())."""
        s_list = list(student_feats.values()) if isinstance(student_feats, Mapping) else list(student_feats)
        t_list = list(teacher_feats.values()) if isinstance(teacher_feats, Mapping) else list(teacher_feats)
        if not len(s_list) == len(t_list) == len(self.adapters):
            raise ValueError(
                f"HintLoss has {len(self.adapters)} adapters but got {len(s_list)} student and "
                f"{len(t_list)} teacher features"
            )
        losses = [self._pair_loss(i, s, t) for i, (s, t) in enumerate(zip(s_list, t_list))]
        return torch.stack(losses).mean()

    def _pair_loss(self, i: int, s: Tensor, t: Tensor) -> Tensor:
        conv = self.adapters[i]
        s, t = _as_4d(s, "student", i), _as_4d(t.detach(), "teacher", i)
        if s.shape[1] != conv.in_channels or t.shape[1] != conv.out_channels:
            raise ValueError(
                f"pair {i}: adapter maps {conv.in_channels}->{conv.out_channels} channels but got "
                f"student {s.shape[1]} and teacher {t.shape[1]} (re-create HintLoss after pruning)"
            )
        s, t = _match_spatial(s, t)
        out = conv(s)
        # Common dtype of at least float32: autocast may hand us fp16/bf16 on either side.
        dtype = torch.promote_types(torch.promote_types(out.dtype, t.dtype), torch.float32)
        return F.mse_loss(out.to(dtype), t.to(dtype))
