"""SDAP (Diao et al., Pattern Recognition 2024): self-distillation enhanced adaptive pruning.

One training run prunes and fine-tunes: a trainable gate multiplies every prunable channel group
(coupled channels share a gate), the lowest-|gate| channels of the whole network are masked
(gate held at 0) at a rate that ramps up cubically, and the frozen pretrained model distils into
its own pruned copy. At the end the gates fold into BN and the masked channels are removed.

Choices that are ours, not the paper's (see docs/methods/sdap.md): the rate ``p`` is the share of
the target metric (params or FLOPs) carried by the masked channels, the final rate is re-searched
with the engine on a gate-free copy at the start and at every epoch end, and the ranking is
recomputed after every optimiser step with masked gates (and their gradients) held at zero, and
(``remove_early``) the masked channels are removed at the first epoch end after the ramp, so that
the remaining epochs fine-tune the pruned network at its own cost (same KD task, same LR schedule);
with ``remove_each_epoch`` the channels masked so far are also cut at every epoch end of the ramp
(their gates are 0: the network computes the same), so its later epochs cost less too.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
from torch import nn

from kdprune.distill import CETask, KDTask
from kdprune.engine import (
    L1,
    TOLERANCE,
    AdaptiveBN,
    AnyAllocation,
    Global,
    GroupsChangedError,
    MaskKind,
    MaskSet,
    PruningPlan,
    Selection,
    apply_plan,
    attach_masks,
    channel_groups,
    fold_gates_into_bn,
    prune_gated,
    prune_to_target,
)
from kdprune.methods.base import (CompressContext, PruneRecipe, adaptive_allocation, ignored_names, latency_info,
                                  require_free_widths, width_floor)
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.methods.sdap_rank import SDAPController, channel_costs, global_keep, keep_to_plan, protected_channels
from kdprune.metrics import complexity
from kdprune.registry import choice
from kdprune.training import SGD, Callback, CarryOptimizerState, Cosine, LoopState, TrainConfig, train

__all__ = ["SDAP", "Gate", "ScaledGate", "GateSaliency", "SDAPController", "GateSchedule", "cubic_rate",
           "channel_costs", "global_keep", "protected_channels", "keep_to_plan", "prepare", "sdap_task", "sdap_stages",
           "gated_windows", "fold_and_remove", "default_sdap_train", "allocation"]


@choice("gate")
@dataclass(frozen=True)
class Gate:
    """The paper's saliency: |g|, the gate's magnitude."""


@choice("scaled-gate")
@dataclass(frozen=True)
class ScaledGate:
    """Ours: |g| times the scale of the affine op it gates (|gamma| of the BatchNorm, a filter's norm
    where no BatchNorm follows): the channel's output scale, comparable across layers where |g| of
    gates in front of BatchNorm-normalised convs is not."""


#: What SDAP ranks channels by.
GateSaliency = Union[Gate, ScaledGate]


def default_sdap_train() -> TrainConfig:
    """SDAP's single prune-and-fine-tune run (ours): 10 epochs of SGD at 0.01 with cosine decay."""
    return TrainConfig(epochs=10, optimizer=SGD(lr=0.01), schedule=Cosine())


@register_recipe("sdap")
@dataclass(frozen=True)
class SDAP(PruneRecipe):
    """SDAP (Diao et al., Pattern Recognition 2024): gated channels masked on a cubic global-rate
    ramp during one KD-from-the-pretrained-model training run (``finetune``), then removed."""

    finetune: TrainConfig = field(default_factory=default_sdap_train)
    ramp_epochs: float = 5.0  # epochs over which the masked fraction ramps up to the target
    temperature: float = 4.0  # KD softmax temperature (self-distillation from the dense model)
    alpha: float = 0.9  # weight of the KD term (0: no self-distillation)
    gate_l1: float = 0.0  # L1 pull on the gates
    # The paper's one global rate, over a saliency with a common scale (saliency below): on the
    # validation split (benchmarks/sdap_global.yaml, 3 seeds, 3 epochs) it beat the uniform rate by
    # 0.21 (50% FLOPs) and 1.27 (25% params) val points; the paper's bare |g| under a global rate
    # lost 1.8-6.0 (it cut ResNet-20's first stage to 1-4 channels). adaptive-bn (EagleEye): the
    # per-layer shape whose L1-pruned, re-estimated copy scores best on the validation set.
    mode: Selection = Global()
    weight_by_cost: bool = True  # rank gates by |g| per unit of FLOPs/params they cost
    saliency: GateSaliency = ScaledGate()  # scaled-gate: |g| * |gamma| (ours, default); gate: |g| (paper)
    remove_early: bool = True  # ours: remove masked channels once the ramp is over (docstring above)
    # ours: also cut the channels masked so far at every epoch end while gated (their gates are 0,
    # so the output is unchanged): the ramp's later epochs run at a smaller cost. On issue 16's grid
    # it took SDAP from 1.53x to 1.33x KDFinetune's epoch time at 25% of params (sdap_wall.md), val on par.
    remove_each_epoch: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ramp_epochs < 0:
            raise ValueError(f"SDAP.ramp_epochs must be >= 0, got {self.ramp_epochs}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SDAP.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or self.gate_l1 < 0:
            raise ValueError("SDAP.temperature must be > 0 and SDAP.gate_l1 >= 0")
        if self.min_width < 1:
            raise ValueError(f"SDAP.min_width must be >= 1, got {self.min_width}")
        if self.round_to is not None:
            raise ValueError("SDAP does not support round_to (gate masks are per channel); leave it None")
        require_free_widths(self, "gate masks are per channel")


def cubic_rate(step: int, ramp_steps: int, final: float) -> float:
    """Masked rate after ``step`` optimiser steps: final * (1 - (1 - t/T)^3), then final (SDAP ramp)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return float(final)
    return float(final) * (1.0 - (1.0 - step / ramp_steps) ** 3)


def _gate_abs(masks: MaskSet, saliency: GateSaliency = Gate()) -> dict[str, torch.Tensor]:
    """Per group, the saliency the ranking uses: |g| or (ScaledGate) |g| times its site's scale."""
    roots = list(masks.groups)
    flat = torch.cat([masks.value(r).detach().abs().reshape(-1) for r in roots]).cpu()  # one sync
    out = dict(zip(roots, flat.split([masks.groups[r].channels for r in roots])))
    if isinstance(saliency, ScaledGate):
        scale = masks.site_scale()
        out = {r: v * scale[r].to(v.dtype) for r, v in out.items()}
    return out


_CUT = -1.0  # |gate| of a channel already cut out: below every live one, so it ranks (and stays) masked


class GateSchedule(Callback):
    """SDAP's per-step masking: cubic ramp of the masked rate, masked gates held at 0 (value and
    gradient), optional L1 on the gates, final rate re-searched at every epoch end; resumable."""

    def __init__(self, masks: MaskSet, ctl: SDAPController, ramp_epochs: float, gate_l1: float = 0.0,
                 saliency: GateSaliency = Gate()) -> None:
        self.masks, self.ctl, self.ramp_epochs, self.gate_l1 = masks, ctl, float(ramp_epochs), float(gate_l1)
        self.saliency = saliency
        self.p_final: float | None = None
        self.keep = {r: torch.ones(g.channels, dtype=torch.bool) for r, g in masks.groups.items()}
        # keep/ranking use the dense network's channel order; alive: those still in the live model
        self.alive = {r: torch.arange(g.channels) for r, g in masks.groups.items()}
        self.epoch_offset, self.horizon = 0, None  # this stage's place in the gated run (epochs)
        self.history: list[dict[str, float]] = []
        self._dev: dict[str, torch.Tensor] = {}

    def ramp_steps(self, state: LoopState) -> int:
        """T of the ramp in optimiser steps (the ramp is clamped to the gated run's length)."""
        return int(round(min(self.ramp_epochs, self.horizon or state.epochs) * state.steps_per_epoch))

    def rate(self, state: LoopState) -> float:
        """p_t at the current step of the gated run."""
        step = state.step + self.epoch_offset * state.steps_per_epoch
        return cubic_rate(step, self.ramp_steps(state), self.p_final or 0.0)

    def gate_abs(self) -> dict[str, torch.Tensor]:
        """The saliency (|gate|, or scaled) per channel of the dense network (``_CUT`` where a channel
        was cut out)."""
        live = _gate_abs(self.masks, self.saliency)
        out = {r: torch.full((len(k),), _CUT) for r, k in self.keep.items()}
        for r, v in live.items():
            out[r][self.alive[r]] = v
        return out

    def live_keep(self) -> dict[str, torch.Tensor]:
        """``keep`` in the live model's channel order."""
        return {r: k[self.alive[r]] for r, k in self.keep.items()}

    def set_keep(self, keep: Mapping[str, torch.Tensor]) -> None:
        """Mask what ``keep`` (dense order) drops; a cut channel stays out even where ``keep`` has it."""
        self.keep = {r: k.clone() for r, k in keep.items()}
        for r, k in self.keep.items():
            cut = torch.ones(len(k), dtype=torch.bool)
            cut[self.alive[r]] = False
            k[cut] = False
        self._dev = {}

    def _on_device(self, root: str, device: torch.device) -> torch.Tensor:
        if root not in self._dev or self._dev[root].device != device:
            self._dev[root] = ~self.keep[root][self.alive[root]].to(device)
        return self._dev[root]  # True = masked, live order

    def _zero_masked(self) -> None:
        for root in self.keep:
            v = self.masks.value(root)
            v.data.masked_fill_(self._on_device(root, v.device), 0.0)

    @torch.no_grad()
    def remask(self, state: LoopState) -> None:
        """Re-rank the gates and mask the lowest p_t (previously masked gates are 0, so rank last)."""
        self._zero_masked()
        self.set_keep(self.ctl.keep_for(self.rate(state), self.gate_abs()))
        self._zero_masked()

    def calibrate(self, state: LoopState, force: bool = False) -> None:
        """Re-search the final rate on the current gates when the kept fraction at it drifted."""
        gabs = self.gate_abs()
        kept = None if self.p_final is None else self.ctl.kept(self.ctl.keep_for(self.p_final, gabs))
        if force or kept is None or abs(kept - self.ctl.target.value) > TOLERANCE / 2:
            self.p_final, kept = self.ctl.search(gabs)
        self.history.append({"epoch": state.epoch + self.epoch_offset, "step": state.step, "p_final": self.p_final,
                             "kept": kept})

    def on_train_start(self, state: LoopState) -> None:
        if self.p_final is None:  # a fresh run (a resumed one restored p_final and the masks)
            self.calibrate(state, force=True)
            self.remask(state)

    @torch.no_grad()
    def on_after_backward(self, state: LoopState) -> None:
        for root in self.keep:
            v = self.masks.value(root)
            if v.grad is None:
                continue
            if self.gate_l1:
                v.grad.add_(torch.sign(v.detach()), alpha=self.gate_l1)
            v.grad.masked_fill_(self._on_device(root, v.device), 0.0)

    def on_step_end(self, state: LoopState) -> None:
        self.remask(state)

    def on_epoch_end(self, state: LoopState, metrics: dict[str, float]) -> None:
        old = self.p_final
        self.calibrate(state)
        if self.p_final != old:
            self.remask(state)
        masked = sum(int((~k).sum()) for k in self.keep.values())
        metrics.update({"sdap_rate": self.rate(state), "sdap_p_final": float(self.p_final or 0.0),
                        "sdap_masked": float(masked), "sdap_kept": float(self.ctl.kept(self.keep))})

    def shrink(self, model: nn.Module, example_input: torch.Tensor) -> tuple[int, dict[str, tuple[torch.Tensor, ...]]]:
        """Cut the masked channels out of the live model now, survivors keep their gates (ours);
        returns how many were cut (0 when none, or when the cut would change the channel groups)
        and which entries of each parameter survived (for the optimizer state to follow)."""
        drop = {r: ~k for r, k in self.live_keep().items()}
        n = sum(int(d.sum()) for d in drop.values())
        if n == 0:
            return 0, {}
        try:
            self.masks, kept = prune_gated(model, self.masks, drop, example_input)
        except GroupsChangedError:
            return 0, {}
        self.alive = {r: a[~drop[r]] for r, a in self.alive.items()}
        self._dev = {}
        return n, kept

    def state_dict(self) -> dict[str, Any]:
        return {"p_final": self.p_final, "keep": {r: k.clone() for r, k in self.keep.items()},
                "alive": {r: a.clone() for r, a in self.alive.items()}, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p_final = state["p_final"]
        self.keep = {r: k.cpu().bool() for r, k in state["keep"].items()}
        if "alive" in state:  # absent in checkpoints from before remove_each_epoch
            self.alive = {r: a.cpu().long() for r, a in state["alive"].items()}
        self.history, self._dev = [dict(h) for h in state["history"]], {}


def sdap_task(recipe: SDAP, ctx: CompressContext) -> CETask | KDTask:
    """CE + KD from the frozen pretrained copy (Hinton et al. 2015 form); alpha=0 -> CE, no teacher."""
    smoothing = recipe.finetune.label_smoothing
    if recipe.alpha == 0:
        return CETask(label_smoothing=smoothing)
    return KDTask(ctx.dense, temperature=recipe.temperature, alpha=recipe.alpha, label_smoothing=smoothing)


@torch.no_grad()
def fold_and_remove(model: nn.Module, masks: MaskSet, keep: Mapping[str, torch.Tensor],
                    example_input: torch.Tensor) -> PruningPlan:
    """SDAP finish: zero masked gates, fold all gates into BN (or the conv), remove masked channels."""
    for root, k in keep.items():
        masks.value(root).data.masked_fill_(~k.to(masks.value(root).device), 0.0)
    fold_gates_into_bn(model, masks)
    plan = keep_to_plan(keep)
    apply_plan(model, example_input.to(next(model.parameters()).device), plan)
    return plan


def allocation(model: nn.Module, recipe: SDAP, ctx: CompressContext) -> tuple[AnyAllocation, dict[str, Any]]:
    """``recipe.mode``, or for ``AdaptiveBN()`` the per-group shape of the candidate whose L1-pruned,
    BN-re-estimated copy of the dense ``model`` scores best on the validation set (EagleEye, Li et al.
    2020): it fixes each group's share of the cut (at every rate of the ramp), SDAP's gates rank the
    channels inside each group."""
    if not isinstance(recipe.mode, AdaptiveBN):
        return recipe.mode, {}
    dense, ignored = copy.deepcopy(model).cpu(), ignored_names(recipe, model)

    def prune_copy(m: nn.Module, alloc: AnyAllocation) -> Any:
        return prune_to_target(m, ctx.example_input.cpu(), recipe.target(), importance=L1(), mode=alloc,
                               min_width=width_floor(recipe, m), ignored_layers=ignored)

    groups = channel_groups(copy.deepcopy(dense), ctx.example_input.cpu(), ignored)
    return adaptive_allocation(dense, recipe, ctx, recipe.mode, prune_copy, "sdap-allocation", shape=groups)


def prepare(model: nn.Module, recipe: SDAP, example_input: torch.Tensor,
            mode: AnyAllocation | None = None) -> tuple[MaskSet, GateSchedule]:
    """Attach SDAP gates (init 1: the network is unchanged) and build the masking callback; ``mode``:
    the allocation (default ``recipe.mode``; what ``allocation`` chose for ``AdaptiveBN()``)."""
    mode = recipe.mode if mode is None else mode
    if isinstance(mode, AdaptiveBN):
        raise ValueError("SDAP: pass the allocation adaptive-BN chose (sdap.allocation) as mode=")
    skeleton = copy.deepcopy(model).cpu()
    x = example_input.detach().cpu()
    groups = channel_groups(copy.deepcopy(skeleton), x, ignored_names(recipe, skeleton))  # a copy: BN stats kept
    ctl = SDAPController(skeleton, groups, x, recipe.target(), mode, width_floor(recipe, skeleton),
                         recipe.weight_by_cost)
    ones = {g.root: torch.ones(g.channels) for g in groups}
    ctl.check_reachable(ones)
    if ctl.meter.latency is not None:  # correct the prediction now, so training masks what will be cut
        ctl.verify(ctl.best_keep(ones)[0], ones)
    masks = attach_masks(model, groups, kind=MaskKind.GATE, init=1.0)
    return masks, GateSchedule(masks, ctl, recipe.ramp_epochs, recipe.gate_l1, recipe.saliency)


def _finish(model: nn.Module, cb: GateSchedule, x: torch.Tensor) -> dict[str, Any]:
    """Meet the target (re-masking with the final gates only if it drifted), fold, remove."""
    ctl, goal = cb.ctl, cb.ctl.target.value
    kept, adjusted = ctl.kept(cb.keep), False
    if abs(kept - goal) > TOLERANCE:
        cb.set_keep(ctl.best_keep(cb.gate_abs())[0])
        kept, adjusted = ctl.kept(cb.keep), True
    if abs(kept - goal) > ctl.target.tolerance:
        raise ValueError(f"SDAP: final masks keep {kept:.4f} of {ctl.target.metric}, target {goal}")
    keep, check = ctl.verify(cb.keep, cb.gate_abs())
    adjusted = adjusted or keep is not cb.keep
    cb.set_keep(keep)
    kept = check.measured if check is not None else kept
    plan = fold_and_remove(model, cb.masks, cb.live_keep(), x)
    c, dense = complexity(model, example_input=x.to(next(model.parameters()).device)), ctl.dense_complexity
    return {"p_final": cb.p_final, "achieved": kept, "final_remask": adjusted,
            "flops_kept": c.flops / dense.flops, "params_kept": c.params / dense.params,
            "channels_removed": plan.num_removed, "calibrations": cb.history, **latency_info(check)}


def sdap_stages(recipe: SDAP) -> tuple[TrainConfig, TrainConfig | None]:
    """The gated stage (until the first epoch end after the ramp, with ``remove_early``) and the
    fine-tune of the pruned network after it, both windows of ``recipe.finetune``'s schedule."""
    ft = recipe.finetune
    gated = max(1, math.ceil(recipe.ramp_epochs))
    if not recipe.remove_early or gated >= ft.epochs:
        return ft, None
    return ft.window(0, gated), ft.window(gated, ft.epochs - gated)


def gated_windows(gated: TrainConfig, each_epoch: bool) -> list[TrainConfig]:
    """The gated stage as one window, or (``remove_each_epoch``) one window per epoch, each a
    slice of the same schedule, so that masked channels can be cut between them."""
    if not each_epoch or gated.epochs == 1:
        return [gated]
    return [gated.window(i, 1) for i in range(gated.epochs)]


def _train_gated(model: nn.Module, recipe: SDAP, ctx: CompressContext, cb: GateSchedule, task: Any,
                 gated: TrainConfig) -> tuple[list[dict], list[int]]:
    """Train the gated stage window by window, cutting the masked channels after every window
    but the last (which ``_finish`` folds and cuts); returns the history and the cuts."""
    windows, history, cuts = gated_windows(gated, recipe.remove_each_epoch), [], []
    carry = CarryOptimizerState()  # momentum follows the surviving channels across each cut
    cb.horizon = gated.epochs  # the ramp is clamped to the gated run, not to one window
    for i, window in enumerate(windows):
        cb.epoch_offset = window.start_epoch - gated.start_epoch
        name = "sdap" if i == 0 else f"sdap-{i + 1}"  # the first window's folder is the whole stage's
        res = train(model, ctx.train, ctx.val, ctx.with_progress(window, name), task=task,
                    out_dir=ctx.stage_dir(name), resume=ctx.resumable(name), callbacks=[cb, carry],
                    record={"method": "sdap", "window": i}, save_model=False)
        history += res.history
        if i + 1 < len(windows):
            carry.hold()
            n, kept = cb.shrink(model, ctx.example_input)
            carry.remap(kept)
            cuts.append(n)
    return history, cuts


@run_recipe.register
def _(recipe: SDAP, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    mode, search = allocation(model, recipe, ctx)
    _, cb = prepare(model, recipe, ctx.example_input, mode)
    task = sdap_task(recipe, ctx)
    gated, pruned = sdap_stages(recipe)
    history, cuts = _train_gated(model, recipe, ctx, cb, task, gated)
    info = _finish(model, cb, ctx.example_input)
    info["recalibration"] = ctx.recalibrate(model, recipe)  # gates folded: every BN re-estimated
    info["train"], info["removed_after_epochs"] = history, gated.epochs if pruned else None
    info["cut_each_epoch"] = cuts
    info.update(search)
    if pruned is not None:  # the rest of the run at the pruned cost
        res = train(model, ctx.train, ctx.val, ctx.with_progress(pruned, "sdap pruned"), task=task,
                    out_dir=ctx.stage_dir("sdap-pruned"), resume=ctx.resumable("sdap-pruned"),
                    record={"method": "sdap", "stage": "pruned"}, save_model=False)
        info["train"] = info["train"] + res.history
    return model, info
