"""Cascade (Miles & Mikolajczyk, BMVC 2020, "Cascaded channel pruning using hierarchical
self-distillation"), read as in shared/methods/cascade.md: the frozen original teaches the
largest teaching assistant, each assistant the next smaller one, the last the student; all of
them are nested channel masks over ONE weight set (``engine.MaskSlots``). Each model's loss is
``CE + alpha * KD(its teacher -> it)`` with the teacher's logits detached, and each model is
pruned by the first-order Taylor saliency ``|sum a * dL/da|`` of its own loss at the mask sites,
accumulated over ``prune_every`` steps and L2-normalised per group. Masks stay nested at every
step. At the end each model is cut out of the shared weights physically; the student is
fine-tuned with KD from the smallest assistant (the dense model without assistants).

This module is where the engine (groups, slotted masks, plans, budget) and distill (KD) meet.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdprune.distill import FrozenTeacher, KDTask, kd_loss
from kdprune.engine import (
    Allocation,
    BudgetError,
    BudgetMeter,
    ChannelGroup,
    Global,
    MaskSlots,
    PruningPlan,
    Target,
    apply_plan,
    channel_groups,
    fit_budget,
    plan_pruning,
    recalibrate_norms,
)
from kdprune.methods.base import (EXTRA_MODELS, CompressContext, PruneRecipe, ignored_names, recal_config,
                                  require_free_widths, width_floor)
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.metrics import LatencyModel, complexity, shared_table
from kdprune.training import SGD, Callback, Cosine, LoopState, TrainConfig, train

__all__ = ["Cascade", "levels", "CascadeTask", "CascadePruner", "taylor_scores", "extract"]


def default_cascade_train() -> TrainConfig:
    """The cascade stage: SGD 0.01, cosine, 6 epochs (pruning in the first half)."""
    return TrainConfig(epochs=6, optimizer=SGD(lr=0.01), schedule=Cosine())


def default_cascade_finetune() -> TrainConfig:
    """The student's fine-tune after extraction: SGD 0.01, cosine, 2 epochs."""
    return TrainConfig(epochs=2, optimizer=SGD(lr=0.01), schedule=Cosine())


@register_recipe("cascade")
@dataclass(frozen=True)
class Cascade(PruneRecipe):
    """Cascade (Miles & Mikolajczyk, BMVC 2020): teacher -> assistants -> student over one weight
    set, each pruned by Taylor saliency of its own distillation loss; ``cascade`` trains and
    prunes them together, ``finetune`` then trains the extracted student."""

    assistants: int = 2  # teaching assistants between the teacher and the student
    levels: tuple[float, ...] | None = None  # kept fractions of the assistants (None: evenly spaced)
    cascade: TrainConfig = field(default_factory=default_cascade_train)
    finetune: TrainConfig = field(default_factory=default_cascade_finetune)
    prune_every: int = 50  # optimiser steps between pruning events
    prune_fraction: float = 0.5  # of the cascade stage over which the models reach their sizes
    temperature: float = 4.0  # KD softmax temperature
    alpha: float = 0.9  # weight of the KD term (1 - alpha: cross-entropy)
    mode: Allocation = Global()  # how the saliency cut is shared among layers

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.assistants < 0 or self.prune_every < 1 or not 0.0 < self.prune_fraction <= 1.0:
            raise ValueError("Cascade needs assistants >= 0, prune_every >= 1 and prune_fraction in (0, 1]")
        if self.temperature <= 0 or self.alpha < 0:
            raise ValueError("Cascade needs temperature > 0 and alpha >= 0")
        if self.round_to is not None:
            raise ValueError("Cascade does not support round_to; leave it None")
        require_free_widths(self, "its masks are nested per channel")
        if self.levels is not None and self.has_target():
            goal = self.target().value
            if len(self.levels) != self.assistants or any(not goal < v < 1 for v in self.levels) \
                    or list(self.levels) != sorted(self.levels, reverse=True):
                raise ValueError(f"Cascade.levels must give {self.assistants} decreasing kept fractions "
                                 f"between the target {goal} and 1, got {self.levels}")


def levels(recipe: Cascade) -> list[float]:
    """Kept fractions of every pruned model, largest assistant first, the student last: the
    assistants evenly spaced between the dense model and the target unless given."""
    goal, n = recipe.target().value, recipe.assistants + 1
    mids = list(recipe.levels) if recipe.levels is not None else [1 - (1 - goal) * j / n for j in range(1, n)]
    return [*mids, goal]


@dataclass(eq=False)
class CascadeTask:
    """Sum over the chain of ``CE(y, z_k) + alpha * T^2 KL(z_{k-1} || z_k)``, z_0 the frozen
    dense teacher, each teacher's logits detached; forward k runs under mask slot k."""

    teacher: nn.Module
    masks: MaskSlots
    temperature: float = 4.0
    alpha: float = 0.9
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, FrozenTeacher):
            self.teacher = FrozenTeacher(self.teacher)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(student logits, {"ce": summed CE, "kd": alpha * summed KD})."""
        with torch.no_grad():
            prev = self.teacher(x)
        ce, kd = [], []
        for k in range(self.masks.slots):
            self.masks.slot = k
            z = model(x)
            ce.append(F.cross_entropy(z, y, label_smoothing=self.label_smoothing))
            kd.append(kd_loss(z, prev, self.temperature))  # detaches prev: no loss reaches its teacher
            prev = z.detach()
        self.masks.slot = self.masks.slots - 1
        return z, {"ce": sum(ce), "kd": self.alpha * sum(kd)}

    def modules(self) -> list[nn.Module]:
        """The frozen dense teacher."""
        return [self.teacher]


def taylor_scores(saliency: Mapping[str, Tensor], removed: Mapping[str, set[int]]) -> dict[str, Tensor]:
    """Accumulated |sum a * dL/da| per channel, L2-normalised per group; channels already removed
    score 0 (they go first, which keeps the masks nested)."""
    out = {}
    for root, s in saliency.items():
        s = s.double().clone()
        s[sorted(removed.get(root, set()))] = 0.0
        norm = s.norm()
        out[root] = (s / norm if norm > 0 else s).float()
    return out


class CascadePruner(Callback):
    """Accumulates each model's Taylor saliency from its own mask row's gradient and, every
    ``prune_every`` steps of the pruning phase, narrows every model (largest first) toward its
    size on a linear ramp, nested inside the next larger one; the last event meets the sizes."""

    def __init__(self, masks: MaskSlots, skeleton: nn.Module, groups: Sequence[ChannelGroup], x: Tensor,
                 recipe: Cascade, events: int) -> None:
        self.masks, self.skeleton, self.groups, self.x, self.recipe = masks, skeleton, list(groups), x, recipe
        self.floor = width_floor(recipe, skeleton)
        self.levels, self.events, self.done = levels(recipe), max(1, events), 0
        k = len(self.levels)
        self.saliency = [{g.root: torch.zeros(g.channels, dtype=torch.float64) for g in groups} for _ in range(k)]
        self.removed: list[dict[str, set[int]]] = [{g.root: set() for g in groups} for _ in range(k)]
        self.history: list[dict[str, Any]] = []
        self.latency: LatencyModel | None = None  # one dense latency fit for every event's meter
        self.latency_check: dict[str, Any] | None = None  # the student's end-to-end check, at the last event

    def owned_parameters(self) -> list[nn.Parameter]:
        """The slotted masks: set by pruning, never by the optimiser."""
        return [self.masks.rows(g) for g in self.groups]

    @torch.no_grad()
    def on_optimizer_step(self, state: LoopState) -> None:
        """Accumulate |sum a dL_k/da| per channel and model; prune on schedule."""
        for g in self.groups:
            rows = self.masks.rows(g)
            if rows.grad is not None:
                grad = rows.grad.detach().abs().double().cpu()
                for k, sal in enumerate(self.saliency):
                    sal[g.root] += grad[k]
                rows.grad = None
        if self.done < self.events and state.step % self.recipe.prune_every == 0:
            self.prune(state.step)

    def prune(self, step: int) -> None:
        """One pruning event for every model, largest first (nesting: each keeps a subset of the
        channels of the model above it)."""
        self.done += 1
        frac = self.done / self.events
        kept = []
        for k, level in enumerate(self.levels):
            forced = {r: set(v) | (self.removed[k - 1][r] if k else set()) for r, v in self.removed[k].items()}
            scores = taylor_scores(self.saliency[k], forced)
            goal = 1 - (1 - level) * frac
            self.removed[k], got = self._fit(scores, forced, goal, final=self.done == self.events,
                                             student=k == len(self.levels) - 1)
            kept.append(got)
            self.saliency[k] = {r: torch.zeros_like(s) for r, s in self.saliency[k].items()}
        self._write_masks()
        self.history.append({"step": step, "kept": kept})

    def _meter(self, target: Target) -> BudgetMeter[PruningPlan]:
        if target.latency is not None and self.latency is None:
            table = shared_table(target.latency_backend, target.latency_batch)
            self.latency = LatencyModel(self.skeleton, self.x, table)
        return BudgetMeter(self.skeleton, self.x, target, partial(apply_plan, groups=self.groups),
                           latency=self.latency)

    def _fit(self, scores: dict[str, Tensor], forced: dict[str, set[int]], goal: float, final: bool,
             student: bool = False) -> tuple[dict[str, set[int]], float]:
        target = replace(self.recipe.target(), **{self.recipe.target().metric: min(goal, 1 - 1e-9)})

        def propose(t: float) -> PruningPlan:
            plan = plan_pruning(self.groups, scores, t, self.recipe.mode, self.floor)
            return PruningPlan({r: sorted(set(plan.removals.get(r, ())) | forced[r]) for r in forced
                                if forced[r] or r in plan.removals})

        try:  # latency: only the student's final size is measured end to end, the rest is predicted
            fit = fit_budget(self.skeleton, self.x, target, propose, meter=self._meter(target),
                             verify=final and student)
            best = fit.best
            if fit.latency is not None:
                self.latency_check = fit.latency.as_dict()
        except BudgetError as e:
            if final:
                raise ValueError(f"Cascade: {e}") from None
            best = e.fit.best  # an intermediate size: the closest plan is good enough
        return {g.root: set(best.candidate.removals.get(g.root, ())) for g in self.groups}, best.kept

    @torch.no_grad()
    def _write_masks(self) -> None:
        for g in self.groups:
            rows = self.masks.rows(g)
            rows.fill_(1.0)
            for k, rem in enumerate(self.removed):
                if rem[g.root]:
                    rows[k, sorted(rem[g.root])] = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "saliency": [{r: s.clone() for r, s in d.items()} for d in self.saliency],
                "removed": [{r: sorted(v) for r, v in d.items()} for d in self.removed], "history": self.history,
                "latency_check": self.latency_check}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done, self.history = int(state["done"]), list(state["history"])
        self.saliency = [{r: s.clone() for r, s in d.items()} for d in state["saliency"]]
        self.removed = [{r: set(v) for r, v in d.items()} for d in state["removed"]]
        self.latency_check = state.get("latency_check")


def extract(model: nn.Module, removed: Mapping[str, set[int]], x: Tensor) -> nn.Module:
    """One model of the chain cut out of the shared weights: a copy without masks, physically
    pruned by its removal sets."""
    m = copy.deepcopy(model)
    m.kdprune_masks.remove()
    apply_plan(m, x.to(next(m.parameters()).device), PruningPlan({r: sorted(v) for r, v in removed.items() if v}))
    return m


def _cascade_stage(recipe: Cascade, model: nn.Module, ctx: CompressContext) -> tuple[CascadePruner, list]:
    """Attach the slotted masks and train the chain, pruning on the way."""
    x = ctx.example_input.detach().cpu()
    skeleton = copy.deepcopy(model).cpu()
    groups = channel_groups(copy.deepcopy(skeleton), x, ignored_names(recipe, skeleton))
    masks = MaskSlots(groups, len(levels(recipe)))
    p = next(model.parameters())
    masks.to(p.device).attach(model)
    cfg = ctx.with_progress(recipe.cascade, "cascade")
    steps = _steps_per_epoch(ctx.train, cfg) * cfg.epochs
    events = round(recipe.prune_fraction * steps) // recipe.prune_every
    pruner = CascadePruner(masks, skeleton, groups, x, recipe, events)
    task = CascadeTask(ctx.dense, masks, recipe.temperature, recipe.alpha, cfg.label_smoothing)
    res = train(model, ctx.train, None, cfg, task=task, out_dir=ctx.stage_dir("cascade"),
                resume=ctx.resumable("cascade"), callbacks=[pruner], record={"method": "cascade"}, save_model=False)
    if pruner.done < pruner.events:  # a short run (max_steps_per_epoch) still meets the sizes
        pruner.done = pruner.events - 1
        pruner.prune(-1)
    return pruner, res.history


def _steps_per_epoch(data: Any, cfg: TrainConfig) -> int:
    n = len(data) // cfg.batch_size + (len(data) % cfg.batch_size > 0)
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


@run_recipe.register
def _(recipe: Cascade, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    pruner, history = _cascade_stage(recipe, model, ctx)
    model.cpu()
    x = ctx.example_input.cpu()
    chain = [extract(model, rem, x) for rem in pruner.removed]
    dense = complexity(ctx.dense, example_input=x)
    recal = replace(recal_config(recipe), seed=recipe.cascade.seed)
    for m in chain[:-1]:  # the shared BN statistics averaged every model of the chain: re-estimate all
        recalibrate_norms(m, ctx.train, recal)
    recal_info = ctx.recalibrate(chain[-1], recipe, seed=recal.seed)
    student, teacher = chain[-1], (chain[-2] if len(chain) > 1 else ctx.dense)
    ft = train(student, ctx.train, ctx.val, ctx.with_progress(recipe.finetune, "cascade finetune"),
               task=KDTask(copy.deepcopy(teacher), recipe.temperature, recipe.alpha, recipe.finetune.label_smoothing),
               out_dir=ctx.stage_dir("finetune"), resume=ctx.resumable("finetune"), save_model=False)
    sizes = [complexity(m, example_input=x) for m in chain]
    info = {"levels": levels(recipe), "events": pruner.history[-1:], "cascade": history, "finetune": ft.history,
            "recalibration": recal_info,
            "flops_kept": [s.flops / dense.flops for s in sizes],
            "params_kept": [s.params / dense.params for s in sizes],
            **({"latency_target": pruner.latency_check} if pruner.latency_check else {})}
    return student, {**info, EXTRA_MODELS: {f"assistants/ta{i + 1}": m.eval() for i, m in enumerate(chain[:-1])}}
