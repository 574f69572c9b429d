"""Baseline recipes users compare against: PFEC L1 + fine-tune, DepGraph group norm, KD fine-tune."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from kdprune.distill import KDTask
from kdprune.engine import (L1, L2, AdaptiveBN, Criterion, Global, PruneReport, Selection, Uniform, channel_groups,
                            prune_to_target)
from kdprune.engine.importance import criterion_label
from kdprune.engine.sparsity import add_group_lasso_grad_
from kdprune.methods.base import (CompressContext, PruneRecipe, adaptive_allocation, ignored_names, latency_info,
                                  width_floor)
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.registry import choice_name
from kdprune.training import SGD, Callback, Cosine, TrainConfig, train


@register_recipe("l1")
@dataclass(frozen=True)
class L1Finetune(PruneRecipe):
    """PFEC (Li et al. 2017): one-shot L1-norm filter pruning to the target, then fine-tune."""

    mode: Selection = Uniform()  # how the cut is shared among layers (adaptive-bn: scored candidates)


@register_recipe("kd")
@dataclass(frozen=True)
class KDFinetune(PruneRecipe):
    """L1 pruning as in L1Finetune, fine-tuned with KD (Hinton et al. 2015) from the dense model."""

    mode: Selection = Uniform()  # how the cut is shared among layers (adaptive-bn: scored candidates)
    temperature: float = 4.0  # KD softmax temperature
    alpha: float = 0.9  # weight of the KD term (1 - alpha: cross-entropy)


def default_sparse() -> TrainConfig:
    """Sparse training before group-norm pruning: 3 epochs at 0.01."""
    return TrainConfig(epochs=3, optimizer=SGD(lr=0.01), schedule=Cosine())


@register_recipe("groupnorm")
@dataclass(frozen=True)
class GroupNorm(PruneRecipe):
    """DepGraph (Fang et al. 2023): group-lasso sparse training on coupled groups, prune by group
    L2 norm (global ranking) to the target, then fine-tune."""

    reg: float = 5e-4  # group-lasso weight of the sparse stage
    sparse: TrainConfig = field(default_factory=default_sparse)
    mode: Selection = Global()  # how the cut is shared among layers (adaptive-bn: scored candidates)


def _prune(model: nn.Module, recipe: PruneRecipe, ctx: CompressContext, importance: Criterion) -> dict:
    """{"prune": what prune_to_target did, "recalibration": the BatchNorm re-estimation after it} (and
    "latency_target": its end-to-end check)."""
    model.cpu()  # prune where the example input lives (a sparse stage may have trained on GPU)
    before, ignored = copy.deepcopy(model), ignored_names(recipe, model)

    def prune_copy(m: nn.Module, mode) -> PruneReport:
        return prune_to_target(m, ctx.example_input, recipe.target(), importance=importance, mode=mode,
                               min_width=width_floor(recipe, m), round_to=recipe.round_to, widths=recipe.widths,
                               ignored_layers=ignored)

    def search_and_prune() -> dict:
        mode, search = recipe.mode, {}
        if isinstance(mode, AdaptiveBN):
            mode, search = adaptive_allocation(model, recipe, ctx, mode, prune_copy, "prune")
        rep = prune_copy(model, mode)
        prune = {"importance": criterion_label(rep.importance), "mode": choice_name(rep.mode), "ratio": rep.ratio,
                 "achieved": rep.achieved, "flops_kept": rep.flops_kept, "params_kept": rep.params_kept,
                 "channels_removed": rep.plan.num_removed, "widths": choice_name(rep.widths)}
        return {"prune": prune, **search, **latency_info(rep.latency)}

    info = ctx.removal_step("prune", model, search_and_prune)  # a resume re-applies the recorded cut
    return {**info, "recalibration": ctx.recalibrate(model, recipe, before)}


def _finetune(model: nn.Module, recipe: PruneRecipe, ctx: CompressContext, task=None) -> list[dict]:
    res = train(model, ctx.train, ctx.val, ctx.with_progress(recipe.finetune, "finetune"), task=task,
                out_dir=ctx.stage_dir("finetune"), resume=ctx.resumable("finetune"), save_model=False)
    return res.history


@run_recipe.register
def _(recipe: L1Finetune, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    info = _prune(model, recipe, ctx, L1())
    info["finetune"] = _finetune(model, recipe, ctx)
    return model, info


@run_recipe.register
def _(recipe: KDFinetune, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    info = _prune(model, recipe, ctx, L1())
    task = KDTask(ctx.dense, temperature=recipe.temperature, alpha=recipe.alpha,
                  label_smoothing=recipe.finetune.label_smoothing)
    info["finetune"] = _finetune(model, recipe, ctx, task)
    return model, info


class GroupLasso(Callback):
    """Adds the group-lasso gradient on the model's channel groups after every backward."""

    def __init__(self, groups, reg: float) -> None:
        self.groups, self.reg = groups, reg

    def on_after_backward(self, state) -> None:
        add_group_lasso_grad_(state.model, self.groups, self.reg)


@run_recipe.register
def _(recipe: GroupNorm, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    groups = channel_groups(model, ctx.example_input, ignored_names(recipe, model))
    sparse = train(model, ctx.train, ctx.val, ctx.with_progress(recipe.sparse, "sparse"),
                   out_dir=ctx.stage_dir("sparse"), resume=ctx.resumable("sparse"),
                   callbacks=[GroupLasso(groups, recipe.reg)], save_model=False)
    info = {"sparse": sparse.history, **_prune(model, recipe, ctx, L2())}
    info["finetune"] = _finetune(model, recipe, ctx)
    return model, info


__all__ = ["L1Finetune", "KDFinetune", "GroupNorm", "GroupLasso", "default_sparse"]
