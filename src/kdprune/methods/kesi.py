"""KESI (Le, Vo, Thoai, BMVC 2020, "Paying more attention to snapshots of Iterative Pruning";
public code lehduong/kesi): rounds of L1 filter pruning, each retrained with a large-LR one-cycle
restart whose last-epoch weights are a snapshot, then the ensemble of all snapshots (plus the
unpruned model) is distilled into the smallest one. Also the paper's PFEC comparison recipes.

This module is where the pruning engine and the distillation package meet; neither imports the
other. Every round is saved under ``out_dir/round{r}`` (trainer checkpoint + ``model/`` written
with ``save_pruned`` + ``round.json``), so a killed run resumes mid-round and the ensemble is
rebuilt with ``load_pruned`` after a restart.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from kdprune.distill import EnsembleTeacher, KDTask, MeanKL, TeacherMode, ensemble_probs
from kdprune.engine import (
    L1,
    Allocation,
    ChannelGroup,
    PruningPlan,
    Target,
    Uniform,
    WidthFloor,
    apply_plan,
    channel_groups,
    importance_scores,
    plan_pruning,
    prune_to_target,
)
from kdprune.io import load_pruned, save_pruned
from kdprune.methods.base import (CompressContext, PruneRecipe, ignored_names, latency_info, require_free_widths,
                                  width_floor)
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.metrics import Complexity, complexity
from kdprune.training import SGD, Adam, Constant, OneCycle, TrainConfig, evaluate, resolve_device, train
from kdprune.utils.dist import barrier, is_main_process
from kdprune.utils.forward import probe_forward
from kdprune.utils.meta import write_json

__all__ = ["KESI", "KESIPFEC", "default_retrain", "default_pfec_retrain", "default_distill",
           "round_goals", "residual_roots", "stage_index", "stage_plan", "prune_round",
           "run_rounds", "ensemble_members", "ensemble_task", "SnapshotEnsemble", "ensemble_accuracy"]

_FACTORY_ATTR = "kdprune_factory"
ROUND_INFO = "round.json"
SNAPSHOT = "model"


def _one_cycle() -> OneCycle:
    """KESI code's one-cycle (Le et al. 2020): 10% warm-up from max/10, cosine down to max/1000."""
    return OneCycle(max_lr=None, pct_start=0.1, div_factor=10.0, final_div_factor=100.0)


def default_retrain() -> TrainConfig:
    """KESI per-round retrain (Le et al. 2020): 40 epochs, SGD 0.1 momentum 0.9 wd 1e-4, one-cycle."""
    return TrainConfig(epochs=40, batch_size=128, optimizer=SGD(lr=0.1, momentum=0.9, weight_decay=1e-4),
                       schedule=_one_cycle())


def default_pfec_retrain() -> TrainConfig:
    """PFEC retrain in Le et al. 2020's comparison: 40 epochs per round at a constant lr 1e-3."""
    return TrainConfig(epochs=40, batch_size=128, optimizer=SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4),
                       schedule=Constant())


def default_distill() -> TrainConfig:
    """KESI ensemble distillation (Le et al. 2020): 40 epochs, Adam one-cycle max lr 1e-3, batch 128."""
    return TrainConfig(epochs=40, batch_size=128, optimizer=Adam(lr=1e-3), schedule=_one_cycle())


def _override(cfg: TrainConfig, epochs: int | None, lr: float | None) -> TrainConfig:
    """`cfg` with epochs and (peak) lr replaced where given; a one-cycle then peaks at that lr."""
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if lr is not None:
        cfg = replace(cfg, optimizer=replace(cfg.optimizer, lr=lr))
        if isinstance(cfg.schedule, OneCycle):
            cfg = replace(cfg, schedule=replace(cfg.schedule, max_lr=None))
    return cfg


@register_recipe("kesi")
@dataclass(frozen=True)
class KESI(PruneRecipe):
    """KESI (Le, Vo, Thoai, BMVC 2020): iterative L1 pruning with one-cycle restarts, then
    distillation of the snapshot ensemble into the last snapshot.

    The per-round plan is either ``stage_ratios`` (fraction of the current channels removed per
    round in each stage, stages = distinct output resolutions, largest first; the last ratio
    repeats) or ``target_flops``/``target_params`` split over the rounds (round r keeps
    ``target**(r/rounds)`` of the input model). ``retrain_epochs``/``max_lr`` and
    ``distill_epochs``/``distill_lr`` override ``finetune``/``distill`` when set;
    ``distill_epochs=0`` is "PFEC + one-cycle" (no distillation).
    """

    rounds: int = 5  # pruning rounds, each retrained with a one-cycle restart
    stage_ratios: tuple[float, ...] | None = None  # per-stage fraction removed per round (instead of a target)
    keep_residual: bool = True  # leave the channels residual additions tie together whole
    mode: Allocation = Uniform()  # how each round's cut is shared among layers
    finetune: TrainConfig = field(default_factory=default_retrain)
    retrain_epochs: int | None = None  # epochs per round (None: finetune's)
    max_lr: float | None = None  # one-cycle peak lr per round (None: finetune's lr)
    distill: TrainConfig = field(default_factory=default_distill)
    distill_epochs: int | None = None  # epochs distilling the snapshot ensemble (0: none, PFEC + one-cycle)
    distill_lr: float | None = None  # lr of the distillation (None: distill's)
    temperature: float = 5.0  # KD softmax temperature
    alpha: float = 1.0  # weight of the KD term (1 - alpha: cross-entropy)
    teacher_mode: TeacherMode = MeanKL()  # mean of per-teacher KLs, or KL to the mean probability
    include_base: bool = True  # the unpruned model is a teacher
    include_last: bool = True  # the last snapshot (the student's start) is a teacher
    # False: distil from the unpruned model alone (KESI's "single teacher" ablation: does the
    # snapshot ensemble beat plain KD from the base after the same rounds?)
    include_snapshots: bool = True

    def target(self) -> Target | None:
        """The final Target, or None when the plan is ``stage_ratios`` (validates the choice)."""
        if self.stage_ratios is None:
            return super().target()
        if self.has_target():
            raise ValueError("KESI: give either stage_ratios or target_flops/target_params/target_latency, not both")
        return None

    def retrain_config(self) -> TrainConfig:
        """The per-round retrain TrainConfig (``finetune`` with retrain_epochs/max_lr applied)."""
        return _override(self.finetune, self.retrain_epochs, self.max_lr)

    def distill_config(self) -> TrainConfig | None:
        """The distillation TrainConfig, or None when ``distill_epochs == 0``."""
        if self.distill_epochs == 0:
            return None
        return _override(self.distill, self.distill_epochs, self.distill_lr)

    def check(self) -> None:
        """Raise ValueError on an inconsistent recipe (called before any work)."""
        self.target()
        if self.rounds < 1:
            raise ValueError(f"KESI.rounds must be >= 1, got {self.rounds}")
        if self.stage_ratios is not None and not all(0.0 <= r < 1.0 for r in self.stage_ratios):
            raise ValueError(f"KESI.stage_ratios must be fractions in [0, 1), got {self.stage_ratios}")
        if self.stage_ratios is not None and len(self.stage_ratios) == 0:
            raise ValueError("KESI.stage_ratios must not be empty")
        if self.stage_ratios is not None:
            require_free_widths(self, "stage_ratios fix each stage's widths; use round_to")
        if self.distill_epochs is not None and self.distill_epochs < 0:
            raise ValueError(f"KESI.distill_epochs must be >= 0, got {self.distill_epochs}")
        if self.distill_config() is not None and not self.include_base and (
                not self.include_snapshots or (not self.include_last and self.rounds == 1)):
            raise ValueError("KESI: no teachers (include_base=False, and include_snapshots=False or rounds=1 with "
                             "include_last=False)")


@register_recipe("pfec")
@dataclass(frozen=True)
class KESIPFEC(KESI):
    """PFEC as compared in Le, Vo, Thoai (BMVC 2020): the same iterative L1 rounds, each
    retrained at a constant small lr (1e-3), no distillation."""

    finetune: TrainConfig = field(default_factory=default_pfec_retrain)
    distill_epochs: int | None = 0


def round_goals(final: float, rounds: int) -> list[float]:
    """Kept fraction of the input model's metric after each round: ``final**(r/rounds)``."""
    return [final ** (r / rounds) for r in range(1, rounds + 1)]


def residual_roots(groups: Sequence[ChannelGroup]) -> list[str]:
    """Roots of groups whose channels flow through a residual addition (the summed stream)."""
    return [g.root for g in groups if any(m.kind == "add" for m in g.members)]


def stage_index(model: nn.Module, x: torch.Tensor, groups: Sequence[ChannelGroup]) -> dict[str, int]:
    """Stage of each group root: rank of its output resolution, largest first; non-spatial last."""
    area: dict[str, int | None] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: Any, out: Any) -> None:
            if name not in area and isinstance(out, torch.Tensor):
                area[name] = int(out.shape[-1] * out.shape[-2]) if out.dim() == 4 else None
        return fn

    probe_forward(model, x, {g.root: hook(g.root) for g in groups})
    sizes = sorted({a for a in area.values() if a is not None}, reverse=True)
    rank = {a: i for i, a in enumerate(sizes)}
    return {g.root: rank.get(area.get(g.root), len(sizes)) for g in groups}


def stage_plan(model: nn.Module, x: torch.Tensor, groups: Sequence[ChannelGroup],
               ratios: Sequence[float], min_width: WidthFloor = 1, round_to: int | None = None) -> PruningPlan:
    """PFEC per-stage plan: remove the ``ratios[stage]`` lowest-L1 filters of each group."""
    stages = stage_index(model, x, groups)
    scores = importance_scores(model, groups, L1())
    removals: dict[str, tuple[int, ...]] = {}
    for s in sorted(set(stages.values())):
        members = [g for g in groups if stages[g.root] == s]
        ratio = ratios[min(s, len(ratios) - 1)]
        removals.update(plan_pruning(members, scores, ratio, Uniform(), min_width, round_to).removals)
    return PruningPlan(removals)


def _metric(c: Complexity, recipe: KESI) -> int:
    """The budgeted quantity of ``c``: FLOPs or params, as the recipe's target says."""
    return c.flops if recipe.target_flops is not None else c.params


def prune_round(recipe: KESI, model: nn.Module, x: torch.Tensor, goal: float | None,
                dense: Complexity, reference: nn.Module | None = None) -> dict[str, Any]:
    """One round of L1 filter pruning in place (Li et al. 2017, as in Le et al. 2020); a latency
    goal is a fraction of ``reference``'s (the input model's) measured latency."""
    user = ignored_names(recipe, model)
    groups = channel_groups(model, x, user)
    skip = set(residual_roots(groups)) if recipe.keep_residual else set()
    skip |= set(user)
    removed, check = 0, None
    if recipe.stage_ratios is not None:
        plan = stage_plan(model, x, [g for g in groups if g.root not in skip], recipe.stage_ratios,
                          width_floor(recipe, model), recipe.round_to)
        apply_plan(model, x, plan)
        removed = plan.num_removed
    else:
        if goal is None:
            raise ValueError("a target_flops/target_params/target_latency plan needs this round's goal")
        final = recipe.target()
        if final.latency is not None:  # relative to the input model, so rounds do not compound errors
            target, rel = replace(final, latency=goal), goal
        else:
            rel = goal * _metric(dense, recipe) / _metric(complexity(model, example_input=x), recipe)
            target = Target(**{final.metric: rel}) if rel < 1.0 else None
        if target is not None and rel < 1.0:
            rep = prune_to_target(model, x, target, importance=L1(), mode=recipe.mode,
                                  min_width=width_floor(recipe, model),
                                  round_to=recipe.round_to, widths=recipe.widths, ignored_layers=sorted(skip),
                                  reference=reference if final.latency is not None else None)
            removed, check = rep.plan.num_removed, rep.latency
    after = complexity(model, example_input=x)
    return {"goal": goal, "channels_removed": removed, "flops_kept": after.flops / dense.flops,
            "params_kept": after.params / dense.params, "params": after.params, "flops": after.flops,
            **latency_info(check)}


class _DenseCopy:
    """Zero-arg factory: a fresh copy of the unpruned input (for models outside the zoo)."""

    def __init__(self, dense: nn.Module) -> None:
        self.dense = dense

    def __call__(self) -> nn.Module:
        return copy.deepcopy(self.dense)


def _factory(ctx: CompressContext) -> Any:
    """What save_pruned/load_pruned need to rebuild snapshots of this model (None for zoo models)."""
    dense = ctx.dense
    if getattr(dense, "kdprune_spec", None) is not None:
        return None
    return ctx.factory or getattr(dense, _FACTORY_ATTR, None) or _DenseCopy(dense)


def _load_round(ctx: CompressContext, name: str, factory: Any) -> tuple[nn.Module, dict] | None:
    """A finished round's snapshot and info from disk, when resuming; else None."""
    d = ctx.stage_dir(name)
    if not ctx.resume or d is None or not (d / ROUND_INFO).is_file():
        return None
    model = load_pruned(d / SNAPSHOT, factory=factory)
    if isinstance(getattr(model, _FACTORY_ATTR, None), _DenseCopy):
        model.__dict__.pop(_FACTORY_ATTR, None)  # internal: do not leak into the user's saves
    return model, json.loads((d / ROUND_INFO).read_text())


def _save_round(ctx: CompressContext, name: str, model: nn.Module, info: dict, factory: Any) -> None:
    """Snapshot (save_pruned) then round.json, which marks the round finished."""
    d = ctx.stage_dir(name)
    if d is not None and is_main_process():
        save_pruned(model, d / SNAPSHOT, factory=factory)
        write_json(d / ROUND_INFO, info)
    barrier()


def _round(recipe: KESI, model: nn.Module, ctx: CompressContext, r: int, goal: float | None,
           dense: Complexity, factory: Any) -> tuple[nn.Module, dict]:
    """Prune, retrain with a restart, keep the last epoch as snapshot r (or load it on resume)."""
    name = f"round{r}"
    done = _load_round(ctx, name, factory)
    if done is not None:
        return done
    model.to("cpu")  # trace and measure on the example input's device
    before = copy.deepcopy(model)
    try:
        info: dict[str, Any] = {"round": r, "prune": prune_round(recipe, model, ctx.example_input, goal, dense,
                                                                 ctx.dense)}
    except ValueError as e:
        raise ValueError(f"KESI round {r}: {e}") from None
    info["recalibration"] = ctx.recalibrate(model, recipe, before)
    res = train(model, ctx.train, ctx.val, ctx.with_progress(recipe.retrain_config(), f"round {r}/{recipe.rounds}"),
                out_dir=ctx.stage_dir(name), resume=ctx.resumable(name), save_model=False)
    info["retrain"] = res.history
    info["snapshot_top1"] = res.history[-1].get("val_top1") if res.history else None
    _save_round(ctx, name, model, info, factory)
    return model, info


def run_rounds(recipe: KESI, model: nn.Module, ctx: CompressContext) -> tuple[list[nn.Module], list[dict]]:
    """All pruning rounds; returns the snapshots (last-epoch weights) and per-round info."""
    dense = complexity(ctx.dense, example_input=ctx.example_input)
    final = recipe.target()
    goals = round_goals(final.value, recipe.rounds) if final is not None else [None] * recipe.rounds
    factory = _factory(ctx)
    snapshots: list[nn.Module] = []
    infos: list[dict] = []
    for r, goal in enumerate(goals, start=1):
        current = model if r == 1 else copy.deepcopy(snapshots[-1])  # snapshots stay intact
        snap, info = _round(recipe, current, ctx, r, goal, dense, factory)
        snapshots.append(snap)
        infos.append(info)
    return snapshots, infos


def ensemble_members(recipe: KESI, snapshots: Sequence[nn.Module],
                     dense: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the teachers: unpruned model, every snapshot (last one optional; none
    with include_snapshots=False)."""
    members = [("base", copy.deepcopy(dense))] if recipe.include_base else []
    if not recipe.include_snapshots:
        return members
    last = len(snapshots) if recipe.include_last else len(snapshots) - 1
    return members + [(f"round{i + 1}", s) for i, s in enumerate(snapshots[:last])]


def ensemble_task(recipe: KESI, teachers: Sequence[nn.Module], label_smoothing: float = 0.0) -> KDTask:
    """KD from the frozen snapshot ensemble: alpha * mean_n T^2 KL(p_n || p_s) (batchmean), or
    T^2 KL(mean_n p_n || p_s) with teacher_mode=MeanProb(), plus (1 - alpha) * CE."""
    return KDTask(EnsembleTeacher(list(teachers)), temperature=recipe.temperature, alpha=recipe.alpha,
                  label_smoothing=label_smoothing, teacher_mode=recipe.teacher_mode)


class SnapshotEnsemble(nn.Module):
    """The snapshot ensemble's prediction (Le et al. 2020): log of the members' mean softmax."""

    def __init__(self, teacher: EnsembleTeacher) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log mean probability: argmax is the ensemble vote, cross-entropy its NLL."""
        p = ensemble_probs(self.teacher(x), 1.0)
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def ensemble_accuracy(teacher: EnsembleTeacher, data: Any, cfg: TrainConfig) -> dict[str, float]:
    """Top-1/top-5/loss of the probability-averaged ensemble on ``data``."""
    device = resolve_device(cfg.device)
    model = SnapshotEnsemble(teacher).to(device)
    return evaluate(model, data, cfg.eval_batch_size, device, cfg.bf16)


def _distill(recipe: KESI, student: nn.Module, task: KDTask, ctx: CompressContext) -> list[dict]:
    """Distil the frozen snapshot ensemble into the student (Le et al. 2020), resumable."""
    cfg = recipe.distill_config()
    assert cfg is not None
    res = train(student, ctx.train, ctx.val, ctx.with_progress(cfg, "distill"), task=task,
                out_dir=ctx.stage_dir("distill"), resume=ctx.resumable("distill"), save_model=False)
    return res.history


@run_recipe.register
def _(recipe: KESI, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    """KESI / PFEC rounds, the snapshot ensemble's accuracy, then ensemble distillation."""
    recipe.check()
    snapshots, rounds = run_rounds(recipe, model, ctx)
    student = copy.deepcopy(snapshots[-1])
    members = ensemble_members(recipe, snapshots, ctx.dense)
    info: dict[str, Any] = {"rule": "stage_ratios" if recipe.stage_ratios is not None else "target",
                            "rounds": rounds, "ensemble": {"members": [n for n, _ in members]}}
    if "latency_target" in rounds[-1]["prune"]:  # the last round's check is the final model's
        info["latency_target"] = rounds[-1]["prune"]["latency_target"]
    distill_cfg = recipe.distill_config()
    task = ensemble_task(recipe, [m for _, m in members],
                         distill_cfg.label_smoothing if distill_cfg is not None else 0.0) if members else None
    if task is not None and ctx.val is not None:
        info["ensemble"].update(ensemble_accuracy(task.teacher, ctx.val, recipe.retrain_config()))
    info["distill"] = _distill(recipe, student, task, ctx) if distill_cfg is not None else None
    last = (info["distill"] or rounds[-1]["retrain"] or [{}])[-1]
    info["final_top1_last_epoch"] = last.get("val_top1")
    return student, info
