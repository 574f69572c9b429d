"""Peer rows run through the peers' own code: torch-pruning's ``MagnitudePruner`` and
``GroupNormPruner`` (the DepGraph library of Fang et al. 2023) choose and remove the channels,
kdprune only fits their ``pruning_ratio`` to the FLOPs/params target (the engine's budget
service) and fine-tunes exactly as ``L1Finetune`` does.

torch-pruning edits modules in place and keeps no log kdprune can replay, so every group the
pruner removes is recorded as a kdprune ``prune_channels`` edit (the root layer and the root
indices torch-pruning chose; replay rebuilds the same DepGraph group from them). After the final
prune the recorded edits are replayed on a copy of the input model and must reproduce the peer's
pruned weights bit for bit, so ``save_pruned``/``load_pruned`` round-trip the peer's model.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn

# barrier_pruners: torch-pruning's own extension point for layers it cannot trace through
# (option-A shortcuts), so the peer sees the same graph kdprune replays.
from kdprune.engine import (Allocation, Global, Target, Uniform, apply_channel_edits, barrier_pruners, build_graph,
                            classifier_layers, find_barriers, fit_budget, prune_channels_edit, record_edit)
from kdprune.methods.base import CompressContext, PruneRecipe, ignored_names, latency_info, require_free_widths
from kdprune.methods.baselines import default_sparse
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.registry import choice_name
from kdprune.training import Callback, TrainConfig, train

__all__ = ["TPMagnitude", "TPGroupNorm", "TPRegularizer", "tp_prune", "PeerSetup"]


def _check_peer(recipe: Any) -> None:
    require_free_widths(recipe, "torch-pruning rounds widths with round_to only")
    if recipe.min_width != 1 or recipe.layer_min_width:
        raise ValueError(f"{type(recipe).__name__}: torch-pruning has no minimum width; bound the per-layer "
                         "pruning with max_pruning_ratio instead of min_width / layer_min_width, or keep a "
                         "layer whole with ignored_layers")
    if not 0.0 < recipe.max_pruning_ratio < 1.0:
        raise ValueError(f"{type(recipe).__name__}.max_pruning_ratio must be in (0, 1), "
                         f"got {recipe.max_pruning_ratio}")
    if recipe.norm < 1:
        raise ValueError(f"{type(recipe).__name__}.norm must be >= 1, got {recipe.norm}")


@register_recipe("tp-magnitude")
@dataclass(frozen=True)
class TPMagnitude(PruneRecipe):
    """torch-pruning's MagnitudePruner (DepGraph, Fang et al. 2023) with its group Lp-norm
    importance (``norm`` = p; 1: the L1 filter norm of Li et al. 2017), its ``pruning_ratio`` fitted to
    the target, then the same fine-tune as L1Finetune. ``mode``: Uniform() is its local
    (per-layer) pruning, Global() its ``global_pruning``."""

    norm: int = 1  # p of torch-pruning's GroupMagnitudeImportance
    mode: Allocation = Uniform()
    max_pruning_ratio: float = 0.9  # torch-pruning's per-layer cap; the fitted ratio never exceeds it

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_peer(self)


@register_recipe("tp-groupnorm")
@dataclass(frozen=True)
class TPGroupNorm(PruneRecipe):
    """torch-pruning's GroupNormPruner (DepGraph, Fang et al. 2023): sparse training with the
    pruner's own ``regularize`` (strength ``reg``) after every backward, group L2-norm pruning
    with its ``pruning_ratio`` fitted to the target, then the same fine-tune as L1Finetune."""

    norm: int = 2  # p of torch-pruning's GroupMagnitudeImportance
    reg: float = 5e-4  # torch-pruning's group-norm regularisation weight
    sparse: TrainConfig = field(default_factory=default_sparse)
    mode: Allocation = Global()
    max_pruning_ratio: float = 0.9  # torch-pruning's per-layer cap

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_peer(self)
        if self.reg < 0:
            raise ValueError(f"TPGroupNorm.reg must be >= 0, got {self.reg}")


@dataclass(frozen=True)
class PeerSetup:
    """What every torch-pruning pruner of one model is built with: the layers it must not prune
    (classifier outputs, by name) and the custom pruners for kdprune's channel barriers."""

    ignored: tuple[str, ...]
    barrier_types: tuple[type, ...]

    @classmethod
    def of(cls, model: nn.Module, example_input: torch.Tensor, user: Sequence[str] = ()) -> "PeerSetup":
        """Found once on the unpruned model (kdprune's classifier rule and barrier scan; ``user``: the
        recipe's ignored_layers)."""
        names = {m: n for n, m in model.named_modules()}
        ignored = tuple(names[m] for m in classifier_layers(model, build_graph(model, example_input)))
        ignored += tuple(n for n in user if n not in ignored)
        barriers = tuple({type(model.get_submodule(n)) for n in find_barriers(model, example_input)})
        return cls(ignored, barriers)

    def kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Keyword arguments for a torch-pruning pruner of ``model`` (a copy has its own modules)."""
        return {"ignored_layers": [model.get_submodule(n) for n in self.ignored],
                "customized_pruners": barrier_pruners(self.barrier_types)}


def _pruner_type(recipe: Any) -> type:
    return tp.pruner.GroupNormPruner if isinstance(recipe, TPGroupNorm) else tp.pruner.MagnitudePruner


def _make_pruner(recipe: Any, model: nn.Module, x: torch.Tensor, setup: PeerSetup, ratio: float) -> Any:
    extra = {"reg": recipe.reg} if isinstance(recipe, TPGroupNorm) else {}
    return _pruner_type(recipe)(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=recipe.norm), pruning_ratio=ratio,
        global_pruning=isinstance(recipe.mode, Global), max_pruning_ratio=recipe.max_pruning_ratio,
        round_to=recipe.round_to, **setup.kwargs(model), **extra)


def tp_prune(recipe: Any, model: nn.Module, x: torch.Tensor, setup: PeerSetup, ratio: float) -> list[dict]:
    """One step of the recipe's torch-pruning pruner at ``ratio`` on ``model`` in place; each
    group it prunes is recorded as a kdprune prune_channels edit (returned too)."""
    names = {m: n for n, m in model.named_modules()}
    pruner = _make_pruner(recipe, model, x, setup, ratio)
    edits = []
    for group in pruner.step(interactive=True):  # the pruner's own choice, one group at a time
        root = group[0].dep.target.module
        edit = prune_channels_edit(names[root], [int(i) for i in group[0].idxs])
        group.prune()
        record_edit(model, edit, x)
        edits.append(edit)
    return edits


def _check_replay(dense: nn.Module, pruned: nn.Module, edits: list[dict], x: torch.Tensor) -> None:
    """The recorded edits, replayed by kdprune on the input model, give the peer's weights exactly."""
    replayed = copy.deepcopy(dense)
    apply_channel_edits(replayed, edits, x)
    a, b = pruned.state_dict(), replayed.state_dict()
    same = list(a) == list(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    if same:  # buffers outside the state dict (option-A channel placements) must agree too
        probe = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        was_training = pruned.training
        with torch.no_grad():
            same = torch.equal(pruned.eval()(probe), replayed.eval()(probe))
        pruned.train(was_training)
    if not same:
        raise ValueError("torch-pruning pruned this model in a way kdprune's structure log cannot replay "
                           "(the saved model would not load); use a kdprune recipe (l1, groupnorm) instead")


def _fit_and_prune(recipe: Any, model: nn.Module, ctx: CompressContext) -> dict[str, Any]:
    """Fit the pruner's ratio to the target with the budget service (a latency target: predicted,
    then measured end to end), then prune ``model`` in place; the method info."""
    model.cpu()  # prune where the example input lives (a sparse stage may have trained on GPU)
    x, target = ctx.example_input, recipe.target()
    setup = PeerSetup.of(model, x, ignored_names(recipe, model))
    reference = copy.deepcopy(model)
    apply: Callable = lambda m, inp, ratio: tp_prune(recipe, m, inp, setup, ratio)  # noqa: E731

    def run() -> dict[str, Any]:
        with _peer_errors(recipe, model, "prune"):
            fit = fit_budget(model, x, target, lambda t: round(t * recipe.max_pruning_ratio, 6), apply=apply,
                             key=lambda ratio: ratio, limits=f" by {_pruner_type(recipe).__name__} under "
                             f"max_pruning_ratio={recipe.max_pruning_ratio}", advice=" (torch-pruning's ratio "
                             "steps are too coarse here); try mode=Global() or another target")
            edits = tp_prune(recipe, model, x, setup, fit.best.candidate)
        _check_replay(reference, model, edits, x)
        return {"prune": _prune_info(recipe, target, fit, edits), **latency_info(fit.latency)}

    info = ctx.removal_step("prune", model, run)  # a resume re-applies the recorded cut
    return {**info, "recalibration": ctx.recalibrate(model, recipe, reference)}


def _prune_info(recipe: Any, target: Target, fit: Any, edits: list[dict]) -> dict[str, Any]:
    pruned = fit.best.complexity
    achieved = fit.latency.measured if fit.latency is not None else fit.best.kept
    return {"pruner": f"torch_pruning.pruner.{_pruner_type(recipe).__name__}", "torch_pruning": tp.__version__,
            "importance": f"GroupMagnitudeImportance(p={recipe.norm})", "mode": choice_name(recipe.mode),
            "ratio": fit.best.candidate, "achieved": achieved, "metric": target.metric,
            "tolerance": target.tolerance, "params": pruned.params, "flops": pruned.flops,
            "channels_removed": sum(len(e["idxs"]) for e in edits), "evaluations": fit.evaluations}


class TPRegularizer(Callback):
    """Sparse training as torch-pruning does it: ``pruner.regularize(model)`` after every backward."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def on_after_backward(self, state) -> None:
        self.pruner.regularize(state.model)


def _check_regularize(recipe: Any, model: nn.Module, x: torch.Tensor, setup: PeerSetup) -> None:
    """One regularisation step on a copy before training: the peer library's own failure (an
    IndexError on grouped, non-depthwise convs) becomes a one-line error naming the way out."""
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.grad = torch.zeros_like(p)
    with _peer_errors(recipe, model, "regularise"):
        _make_pruner(recipe, probe, x, setup, 0.5).regularize(probe)


@contextlib.contextmanager
def _peer_errors(recipe: Any, model: nn.Module, verb: str) -> Iterator[None]:
    """The peer library's own failures (an IndexError on grouped, non-depthwise convs or on channel
    slices, issues 31/34) as a one-line error naming the way out."""
    try:
        yield
    except (IndexError, RuntimeError, KeyError, ZeroDivisionError) as e:
        group_norm = isinstance(recipe, TPGroupNorm)
        ours, theirs = ("groupnorm", "GroupNormPruner") if group_norm else ("l1", "MagnitudePruner")
        raise ValueError(f"torch-pruning {tp.__version__}'s {theirs} cannot {verb} "
                         f"{type(model).__name__} ({type(e).__name__}: {str(e).splitlines()[0][:120]}; it fails on "
                         f"grouped, non-depthwise convs and on channel slices); use kdprune's own --method {ours} "
                         "instead") from None


def _finetune(model: nn.Module, recipe: PruneRecipe, ctx: CompressContext) -> list[dict]:
    res = train(model, ctx.train, ctx.val, ctx.with_progress(recipe.finetune, "finetune"),
                out_dir=ctx.stage_dir("finetune"), resume=ctx.resumable("finetune"), save_model=False)
    return res.history


@run_recipe.register
def _(recipe: TPMagnitude, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    info = _fit_and_prune(recipe, model, ctx)
    info["finetune"] = _finetune(model, recipe, ctx)
    return model, info


@run_recipe.register
def _(recipe: TPGroupNorm, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    model.cpu()
    setup = PeerSetup.of(model, ctx.example_input, ignored_names(recipe, model))
    # The sparse stage's pruner only regularises (its ratio is unused); pruning builds fresh ones.
    pruner = _make_pruner(recipe, model, ctx.example_input, setup, 0.5)
    _check_regularize(recipe, model, ctx.example_input, setup)
    sparse = train(model, ctx.train, ctx.val, ctx.with_progress(recipe.sparse, "sparse"),
                   out_dir=ctx.stage_dir("sparse"), resume=ctx.resumable("sparse"),
                   callbacks=[TPRegularizer(pruner)], save_model=False)
    info = {"sparse": sparse.history, **_fit_and_prune(recipe, model, ctx)}
    info["finetune"] = _finetune(model, recipe, ctx)
    return model, info
