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
the remaining epochs fine-tune the pruned network at its own cost (same KD task, same LR schedule).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from kdprune.distill import CETask, KDTask
from kdprune.engine import (
    TOLERANCE,
    Allocation,
    Bisection,
    BudgetFit,
    BudgetMeter,
    ChannelGroup,
    LatencyCheck,
    Global,
    MaskKind,
    MaskSet,
    Member,
    PruningPlan,
    Refine,
    Target,
    Uniform,
    apply_plan,
    attach_masks,
    bisect_budget,
    channel_groups,
    fold_gates_into_bn,
    plan_key,
    plan_pruning,
    search_budget,
    verify_latency,
)
from kdprune.methods.base import CompressContext, PruneRecipe, latency_info, require_free_widths
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.metrics import complexity, layer_table
from kdprune.training import SGD, Callback, Cosine, LoopState, TrainConfig, train

__all__ = ["SDAP", "SDAPController", "GateSchedule", "cubic_rate", "channel_costs", "global_keep",
           "protected_channels", "keep_to_plan", "prepare", "sdap_task", "sdap_stages", "fold_and_remove",
           "default_sdap_train"]

# The final rate: 30 halvings (far finer than one channel's share), keeping the closer bracket end;
# then single-channel moves or cross-group swaps (ours) for coarse networks.
_BISECTION = Bisection(steps=30, first_within=False)
_REFINE = Refine(rounds=16)


def default_sdap_train() -> TrainConfig:
    """SDAP's single prune-and-fine-tune run (ours): 10 epochs of SGD at 0.01 with cosine decay."""
    return TrainConfig(epochs=10, optimizer=SGD(lr=0.01), schedule=Cosine())


@register_recipe("sdap")
@dataclass(frozen=True)
class SDAP(PruneRecipe):
    """SDAP (Diao et al., Pattern Recognition 2024): gated channels masked on a cubic global-rate
    ramp during one KD-from-the-pretrained-model training run (``finetune``), then removed."""

    finetune: TrainConfig = field(default_factory=default_sdap_train)
    ramp_epochs: float = 5.0
    temperature: float = 4.0
    alpha: float = 0.9
    gate_l1: float = 0.0
    # Uniform, not the paper's global rate: on the held-out split (issue 16, docs/methods/sdap.md)
    # the global |gate| ranking cut ResNet-20's first stage to 1-4 channels and lost 0.84 points at
    # 25% of params (tied at 50% of FLOPs).
    mode: Allocation = Uniform()
    weight_by_cost: bool = True
    remove_early: bool = True  # ours: remove masked channels once the ramp is over (docstring above)

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


def channel_costs(model: nn.Module, groups: Sequence[ChannelGroup], metric: str,
                  example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Params or FLOPs each channel carries (SDAP ranking weights): its share of every coupled
    producer (output slice) and consumer (input slice), in root channel order."""
    table = {r["name"]: r for r in layer_table(model, example_input=example_input)}
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        w = torch.zeros(g.channels, dtype=torch.float64)
        produced = {m.name for m in g.members if m.role == "out"}
        for m in g.members:
            row = table.get(m.name)
            if row is None or not m.root_idxs or (m.role == "in" and m.name in produced):
                continue
            width = row["out"] if m.role == "out" else row["in"]
            if width:
                idx = torch.tensor(m.root_idxs, dtype=torch.long)
                w.index_add_(0, idx, torch.full((len(idx),), _cost(model, m, row, metric) / width,
                                                dtype=torch.float64))
        out[g.root] = w
    return out


def _cost(model: nn.Module, m: Member, row: Mapping[str, Any], metric: str) -> float:
    """A member's cost to share over its channels: a consumer's params are its weight only
    (its bias does not shrink with its inputs)."""
    if metric == "params" and m.role == "in":
        return float(model.get_submodule(m.name).weight.numel())
    return float(row[metric])


def protected_channels(group: ChannelGroup, gate_abs: torch.Tensor, min_width: int) -> torch.Tensor:
    """SDAP min-width rule: the ``min_width`` largest-|gate| channels of a group (and the best
    channel of each concat producer) are never masked; ties go to the higher index."""
    c = group.channels
    order = torch.sort(gate_abs.double().cpu(), stable=True).indices  # ascending
    prot = torch.zeros(c, dtype=torch.bool)
    prot[order[c - min(min_width, c):]] = True
    rank = torch.empty(c, dtype=torch.long)
    rank[order] = torch.arange(c)
    for m in group.producers:
        own = torch.tensor(sorted(set(m.root_idxs)), dtype=torch.long)
        if 0 < len(own) < c and not prot[own].any():
            prot[own[rank[own].argmax()]] = True
    return prot


def global_keep(groups: Sequence[ChannelGroup], gate_abs: Mapping[str, torch.Tensor],
                weights: Mapping[str, torch.Tensor], rate: float, min_width: int = 1) -> dict[str, torch.Tensor]:
    """SDAP global ranking: mask the lowest-|gate| unprotected channels of the whole network while
    their summed weight stays <= rate * total weight; returns keep masks (True = keep)."""
    g_abs = torch.cat([gate_abs[g.root].detach().double().cpu() for g in groups])
    w = torch.cat([weights[g.root].double().cpu() for g in groups])
    prot = torch.cat([protected_channels(g, gate_abs[g.root], min_width) for g in groups])
    cand = (~prot).nonzero().flatten()
    order = cand[torch.sort(g_abs[cand], stable=True).indices]
    cum = torch.cumsum(w[order], 0)
    k = int(torch.searchsorted(cum, torch.tensor([rate * float(w.sum())], dtype=torch.float64),
                               right=True))
    keep = torch.ones(len(g_abs), dtype=torch.bool)
    keep[order[:k]] = False
    return dict(zip([g.root for g in groups], keep.split([g.channels for g in groups])))


def keep_to_plan(keep: Mapping[str, torch.Tensor]) -> PruningPlan:
    """Keep masks -> the engine's PruningPlan of masked channels."""
    return PruningPlan({r: (~k).nonzero().flatten().tolist() for r, k in keep.items() if not k.all()})


def _apply_keep(groups: Sequence[ChannelGroup], model: nn.Module, x: torch.Tensor,
                keep: Mapping[str, torch.Tensor]) -> None:
    apply_plan(model, x, keep_to_plan(keep), groups)


def _keep_key(keep: Mapping[str, torch.Tensor]) -> tuple:
    return plan_key(keep_to_plan(keep))


class SDAPController:
    """Masks for a rate (global or uniform) and the kept fraction after physical removal, measured
    by the engine's budget service on a gate-free copy (memoised per plan)."""

    def __init__(self, skeleton: nn.Module, groups: Sequence[ChannelGroup], example_input: torch.Tensor,
                 target: Target, mode: Allocation, min_width: int = 1,
                 weight_by_cost: bool = True) -> None:
        self.skeleton, self.groups, self.x, self.target = skeleton, list(groups), example_input, target
        self.mode, self.min_width = mode, min_width
        metric = "flops" if target.metric == "latency" else target.metric  # latency: ranked by FLOPs share
        costs = channel_costs(skeleton, self.groups, metric, example_input) if weight_by_cost else None
        self.weights = costs or {g.root: torch.ones(g.channels, dtype=torch.float64) for g in self.groups}
        self.meter = BudgetMeter(skeleton, example_input, target, partial(_apply_keep, self.groups), _keep_key,
                                 max_cache=4096)
        self.dense_complexity = self.meter.dense
        self.dense = float(getattr(self.dense_complexity, metric))

    def keep_for(self, rate: float, gate_abs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep masks (True = keep) for masked rate ``rate`` given the gate magnitudes."""
        if isinstance(self.mode, Global):
            return global_keep(self.groups, gate_abs, self.weights, rate, self.min_width)
        scores = {r: v.detach().float().cpu() for r, v in gate_abs.items()}
        plan = plan_pruning(self.groups, scores, min(max(rate, 0.0), 1.0), Uniform(), self.min_width)
        keep = {g.root: torch.ones(g.channels, dtype=torch.bool) for g in self.groups}
        for root, idxs in plan.items():
            keep[root][list(idxs)] = False
        return keep

    def kept(self, keep: Mapping[str, torch.Tensor]) -> float:
        """Kept fraction of the target metric once the masked channels are physically removed."""
        return self.meter.kept(keep)

    def search(self, gate_abs: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """Bisection for the final rate whose masks keep the target fraction: (rate, kept)."""
        fit = bisect_budget(self.meter, lambda r: self.keep_for(r, gate_abs), _BISECTION)
        return fit.t, fit.best.kept

    def _move(self, keep: Mapping[str, torch.Tensor], gate_abs: Mapping[str, torch.Tensor],
              g: ChannelGroup, mask_more: bool) -> dict[str, torch.Tensor] | None:
        """``keep`` with one more channel of ``g`` masked (its lowest-|gate| unprotected one) or
        one unmasked (its highest-|gate| masked one); None when there is none."""
        k, s = keep[g.root], gate_abs[g.root].detach().double().cpu()
        pool = k & ~protected_channels(g, s, self.min_width) if mask_more else ~k
        idx = pool.nonzero().flatten()
        if len(idx) == 0:
            return None
        order = idx[torch.sort(s[idx], stable=True).indices]
        out = {r: v.clone() for r, v in keep.items()}
        out[g.root][order[0] if mask_more else order[-1]] = not mask_more
        return out

    def _neighbours(self, keep: Mapping[str, torch.Tensor], gate_abs: Mapping[str, torch.Tensor],
                    over: bool) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Tiers of moves towards the target: single moves, then (only when asked for) each single
        move followed by one opposite move in another group (a swap, finer than any one channel)."""
        singles = [(g, c) for g in self.groups if (c := self._move(keep, gate_abs, g, over)) is not None]
        yield [c for _, c in singles]
        yield [c2 for g, c in singles for h in self.groups
               if h.root != g.root and (c2 := self._move(c, gate_abs, h, not over)) is not None]

    def fit(self, gate_abs: Mapping[str, torch.Tensor]) -> BudgetFit:
        """The budget service's fit for these gates: the searched rate's masks, refined by single
        moves or cross-group swaps (ours, for coarse networks) if they miss by > 1%."""
        return search_budget(self.meter, lambda r: self.keep_for(r, gate_abs),
                             lambda k, over: self._neighbours(k, gate_abs, over), _BISECTION, _REFINE)

    def best_keep(self, gate_abs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float, float]:
        """Final masks for these gates, the rate they came from and their kept fraction."""
        fit = self.fit(gate_abs)
        return fit.best.candidate, fit.t, fit.best.kept

    def check_reachable(self, gate_abs: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """Search once and raise ValueError if the target cannot be met within 1%."""
        fit = self.fit(gate_abs)
        if not fit.met:
            raise ValueError(
                f"SDAP: {self.target.metric} target {self.target.value} cannot be met within "
                f"{self.target.tolerance:.0%} (closest kept fraction {fit.best.kept:.4f}, smallest reachable "
                f"{fit.floor.kept:.4f} under min_width={self.min_width}); choose another target or min_width")
        return fit.t, fit.best.kept

    def verify(self, keep: Mapping[str, torch.Tensor], gate_abs: Mapping[str, torch.Tensor]
               ) -> tuple[Mapping[str, torch.Tensor], LatencyCheck | None]:
        """For a latency target: ``keep`` measured end to end and, when it misses by more than 5%,
        refitted for these gates under the measured/predicted correction; else ``keep`` as it is."""
        if self.meter.latency is None:
            return keep, None
        best, check = verify_latency(self.meter, lambda: self.fit(gate_abs).best, self.meter.measure(keep),
                                     limits=f" under min_width={self.min_width}")
        return best.candidate, check


def _gate_abs(masks: MaskSet) -> dict[str, torch.Tensor]:
    roots = list(masks.groups)
    flat = torch.cat([masks.value(r).detach().abs().reshape(-1) for r in roots]).cpu()  # one sync
    return dict(zip(roots, flat.split([masks.groups[r].channels for r in roots])))


class GateSchedule(Callback):
    """SDAP's per-step masking: cubic ramp of the masked rate, masked gates held at 0 (value and
    gradient), optional L1 on the gates, final rate re-searched at every epoch end; resumable."""

    def __init__(self, masks: MaskSet, ctl: SDAPController, ramp_epochs: float, gate_l1: float = 0.0) -> None:
        self.masks, self.ctl, self.ramp_epochs, self.gate_l1 = masks, ctl, float(ramp_epochs), float(gate_l1)
        self.p_final: float | None = None
        self.keep = {r: torch.ones(g.channels, dtype=torch.bool) for r, g in masks.groups.items()}
        self.history: list[dict[str, float]] = []
        self._dev: dict[str, torch.Tensor] = {}

    def ramp_steps(self, state: LoopState) -> int:
        """T of the ramp in optimiser steps (the ramp is clamped to the run's length)."""
        return int(round(min(self.ramp_epochs, state.epochs) * state.steps_per_epoch))

    def rate(self, state: LoopState) -> float:
        """p_t at the current step."""
        return cubic_rate(state.step, self.ramp_steps(state), self.p_final or 0.0)

    def _on_device(self, root: str, device: torch.device) -> torch.Tensor:
        if root not in self._dev or self._dev[root].device != device:
            self._dev[root] = ~self.keep[root].to(device)
        return self._dev[root]  # True = masked

    def _zero_masked(self) -> None:
        for root in self.keep:
            v = self.masks.value(root)
            v.data.masked_fill_(self._on_device(root, v.device), 0.0)

    @torch.no_grad()
    def remask(self, state: LoopState) -> None:
        """Re-rank the gates and mask the lowest p_t (previously masked gates are 0, so rank last)."""
        self._zero_masked()
        self.keep, self._dev = self.ctl.keep_for(self.rate(state), _gate_abs(self.masks)), {}
        self._zero_masked()

    def calibrate(self, state: LoopState, force: bool = False) -> None:
        """Re-search the final rate on the current gates when the kept fraction at it drifted."""
        gabs = _gate_abs(self.masks)
        kept = None if self.p_final is None else self.ctl.kept(self.ctl.keep_for(self.p_final, gabs))
        if force or kept is None or abs(kept - self.ctl.target.value) > TOLERANCE / 2:
            self.p_final, kept = self.ctl.search(gabs)
        self.history.append({"epoch": state.epoch, "step": state.step, "p_final": self.p_final, "kept": kept})

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

    def state_dict(self) -> dict[str, Any]:
        return {"p_final": self.p_final, "keep": {r: k.clone() for r, k in self.keep.items()},
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p_final = state["p_final"]
        self.keep = {r: k.cpu().bool() for r, k in state["keep"].items()}
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


def prepare(model: nn.Module, recipe: SDAP, example_input: torch.Tensor) -> tuple[MaskSet, GateSchedule]:
    """Attach SDAP gates (init 1: the network is unchanged) and build the masking callback."""
    skeleton = copy.deepcopy(model).cpu()
    x = example_input.detach().cpu()
    groups = channel_groups(copy.deepcopy(skeleton), x)  # trace a copy: BN stats stay untouched
    ctl = SDAPController(skeleton, groups, x, recipe.target(), recipe.mode, recipe.min_width,
                         recipe.weight_by_cost)
    ones = {g.root: torch.ones(g.channels) for g in groups}
    ctl.check_reachable(ones)
    if ctl.meter.latency is not None:  # correct the prediction now, so training masks what will be cut
        ctl.verify(ctl.best_keep(ones)[0], ones)
    masks = attach_masks(model, groups, kind=MaskKind.GATE, init=1.0)
    return masks, GateSchedule(masks, ctl, recipe.ramp_epochs, recipe.gate_l1)


def _finish(model: nn.Module, masks: MaskSet, cb: GateSchedule, x: torch.Tensor) -> dict[str, Any]:
    """Meet the target (re-masking with the final gates only if it drifted), fold, remove."""
    ctl, goal = cb.ctl, cb.ctl.target.value
    kept, adjusted = ctl.kept(cb.keep), False
    if abs(kept - goal) > TOLERANCE:
        cb.keep, _, kept = ctl.best_keep(_gate_abs(masks))
        adjusted = True
    if abs(kept - goal) > ctl.target.tolerance:
        raise ValueError(f"SDAP: final masks keep {kept:.4f} of {ctl.target.metric}, target {goal}")
    keep, check = ctl.verify(cb.keep, _gate_abs(masks))
    adjusted = adjusted or keep is not cb.keep
    cb.keep = dict(keep)
    kept = check.measured if check is not None else kept
    plan = fold_and_remove(model, masks, cb.keep, x)
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
    total = ft.total_epochs()
    return (replace(ft, epochs=gated, schedule_epochs=total),
            replace(ft, epochs=ft.epochs - gated, start_epoch=ft.start_epoch + gated, schedule_epochs=total))


@run_recipe.register
def _(recipe: SDAP, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    masks, cb = prepare(model, recipe, ctx.example_input)
    task = sdap_task(recipe, ctx)
    gated, pruned = sdap_stages(recipe)
    res = train(model, ctx.train, ctx.val, ctx.with_progress(gated, "sdap"), task=task,
                out_dir=ctx.stage_dir("sdap"), resume=ctx.resumable("sdap"), callbacks=[cb],
                record={"method": "sdap"}, save_model=False)
    info = _finish(model, masks, cb, ctx.example_input)
    info["train"], info["removed_after_epochs"] = res.history, gated.epochs if pruned else None
    if pruned is not None:  # the rest of the run at the pruned cost
        res = train(model, ctx.train, ctx.val, ctx.with_progress(pruned, "sdap pruned"), task=task,
                    out_dir=ctx.stage_dir("sdap-pruned"), resume=ctx.resumable("sdap-pruned"),
                    record={"method": "sdap", "stage": "pruned"}, save_model=False)
        info["train"] = info["train"] + res.history
    return model, info
