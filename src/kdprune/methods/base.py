"""What every pruning recipe shares: the target, width rules, the fine-tune config, the context."""
from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from kdprune.engine import (AdaptiveBN, AnyAllocation, ChannelGroup, FreeWidths, LatencyCheck, MinWidth, Recalibrate,
                            Shaped, StructureLog, Target, WidthFloor, WidthPolicy, candidate_allocations, extend,
                            get_structure, recalibrate_norms, select_allocation, shape_of)
from kdprune.utils.dist import is_main_process
from kdprune.utils.meta import write_json
from kdprune.metrics import Backend
from kdprune.registry import check_choice_fields
from kdprune.training import SGD, Cosine, TrainConfig, compute

RECIPE_VERSION = 1

#: Training batches the BatchNorm statistics are re-estimated on after a method's removal step
#: (chosen on the validation split: docs/recalibration.md); a recipe's ``recal_batches=0`` turns it off.
RECAL_BATCHES = 30


def default_finetune() -> TrainConfig:
    """Fine-tuning after pruning: 5 epochs of SGD at 0.01 with cosine decay."""
    return TrainConfig(epochs=5, optimizer=SGD(lr=0.01), schedule=Cosine())


#: Key of a recipe's info dict holding other pruned models it produced ({path under out_dir:
#: model}); compress moves them to CompressResult.extras and saves each there.
EXTRA_MODELS = "models"


@dataclass(frozen=True)
class PruneRecipe:
    """Base of the channel-pruning recipes: a FLOPs, params or measured-latency fraction to keep
    (latency at ``latency_batch`` on ``latency_backend``), width rules."""

    target_flops: float | None = None  # fraction of the FLOPs to keep
    target_params: float | None = None  # fraction of the parameters to keep
    target_latency: float | None = None  # fraction of the measured latency to keep
    latency_batch: int = 1  # batch size the latency target is measured at
    latency_backend: Backend = Backend.EAGER  # backend the latency target is measured on
    min_width: int = 1  # no layer narrower than this many channels
    layer_min_width: tuple[tuple[str, int], ...] = ()  # per-layer floors: (name or glob, channels); CLI stem.*=8
    round_to: int | None = None  # pruned widths a multiple of this (same as widths=RoundTo(n))
    widths: WidthPolicy = FreeWidths()  # which widths a pruned layer may take
    finetune: TrainConfig = field(default_factory=default_finetune)
    recal_batches: int = RECAL_BATCHES  # BN statistics re-estimated after removal (0: off)
    ignored_layers: tuple[str, ...] = ()  # layer names or globs ("stem.*") kept whole, with what they couple
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        check_choice_fields(self)  # typed choices (mode=Global()...): a name string fails here
        if self.has_target():
            self.target_of()  # validates now: exactly one fraction in (0, 1)
        if self.round_to is not None and not isinstance(self.widths, FreeWidths):
            raise ValueError(f"{type(self).__name__}: give round_to or widths, not both")
        MinWidth(self.min_width, self.layer_min_width)  # validates every floor now, not mid-run
        check_recal_batches(self)

    def has_target(self) -> bool:
        """Whether any of target_flops/target_params/target_latency is set."""
        return any(v is not None for v in (self.target_flops, self.target_params, self.target_latency))

    def target_of(self) -> Target:
        """The engine Target these fields describe (validates: exactly one fraction in (0, 1))."""
        return Target(flops=self.target_flops, params=self.target_params, latency=self.target_latency,
                      latency_batch=self.latency_batch, latency_backend=self.latency_backend)

    def target(self) -> Target:
        """The engine Target (validates: exactly one fraction in (0, 1))."""
        return self.target_of()


def _matches(pattern: str, model: nn.Module, where: str) -> list[str]:
    """The module names ``pattern`` (a name or fnmatch glob) selects; ValueError if none (a typo
    would otherwise silently leave the layer to the defaults)."""
    hits = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise ValueError(f"{where}: {pattern!r} names no layer of {type(model).__name__} "
                         f"(`kdprune info PATH --layers` lists them)")
    return hits


def ignored_names(recipe: Any, model: nn.Module) -> list[str]:
    """The module names of ``model`` that ``recipe.ignored_layers`` (names or fnmatch globs) select,
    with their submodules; ValueError for a pattern that selects nothing."""
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pattern in getattr(recipe, "ignored_layers", ()):
        hits = _matches(pattern, model, "ignored_layers")
        # a matched container keeps its parts too (EDP's decomposed conv, a whole block)
        parts = [n for n in names if any(n == h or n.startswith(h + ".") for h in hits)]
        out += [n for n in parts if n not in out]
    return out


def width_floor(recipe: PruneRecipe, model: nn.Module) -> WidthFloor:
    """The recipe's floor on kept widths for ``model``: ``min_width``, raised per layer by
    ``layer_min_width`` (a pattern naming no layer is a ValueError)."""
    if not recipe.layer_min_width:
        return recipe.min_width
    for pattern, _ in recipe.layer_min_width:
        _matches(pattern, model, "layer_min_width")
    # a container's pattern ("layer1") floors the convs inside it, as ignored_layers keeps them
    layers = tuple((p, n) for pattern, n in recipe.layer_min_width for p in (pattern, pattern + ".*"))
    return MinWidth(recipe.min_width, layers)


def adaptive_allocation(model: nn.Module, recipe: PruneRecipe, ctx: CompressContext, sel: AdaptiveBN,
                        prune_copy: Callable[[nn.Module, AnyAllocation], Any], name: str,
                        shape: Sequence[ChannelGroup] | None = None) -> tuple[AnyAllocation, dict[str, Any]]:
    """The allocation EagleEye's adaptive-BN evaluation (Li et al., ECCV 2020) picks for ``model``:
    each candidate pruned by ``prune_copy(copy, allocation)`` (a PruneReport), re-estimated, scored on
    ``ctx.val``; with ``shape`` (the method's groups), the winner's per-group cut as a Shaped allocation.
    Decided once per run (``ctx.decided(name, ...)``), returned with ``{"adaptive_bn": scores}``."""
    x = ctx.example_input.cpu()

    def decide() -> dict[str, Any]:
        chosen, cands = select_allocation(model, x, recipe.target(), sel, ctx.train, ctx.val, prune_copy)
        rec = {"candidates": [c.as_dict() for c in cands],
               "chosen": next(c.name for c in cands if c.allocation is chosen)}
        if shape is not None:  # recorded, not recomputed on resume: a latency-fitted plan could differ
            rec["shape"] = shape_of(prune_copy(copy.deepcopy(model), chosen).plan, list(shape)).weights
        return rec

    rec = ctx.decided(name, decide)
    if "shape" in rec:
        return Shaped(tuple((r, float(w)) for r, w in rec["shape"])), {"adaptive_bn": rec}
    return dict(candidate_allocations(model, x, sel))[rec["chosen"]], {"adaptive_bn": rec}


def check_recal_batches(recipe: Any) -> None:
    """ValueError unless ``recipe.recal_batches`` is a count >= 0."""
    if recipe.recal_batches < 0:
        raise ValueError(f"{type(recipe).__name__}.recal_batches must be >= 0 (0: off), got {recipe.recal_batches}")


def recal_config(recipe: Any) -> Recalibrate:
    """The recipe's BatchNorm re-estimation: ``recal_batches`` batches of its fine-tune batch size and seed."""
    return Recalibrate(batches=recipe.recal_batches, batch_size=recipe.finetune.batch_size, seed=recipe.finetune.seed)


def latency_info(check: LatencyCheck | None) -> dict[str, Any]:
    """``{"latency_target": ...}`` for a method's info when a latency target was checked, else {}."""
    return {"latency_target": check.as_dict()} if check is not None else {}


def require_free_widths(recipe: PruneRecipe, why: str) -> None:
    """ValueError unless the recipe leaves widths free (methods whose masks are per channel)."""
    if not isinstance(recipe.widths, FreeWidths):
        raise ValueError(f"{type(recipe).__name__} does not support widths={type(recipe.widths).__name__}(...) "
                         f"({why}); leave it FreeWidths()")


@dataclass
class CompressContext:
    """Data and places a recipe works with; `dense` is an untouched copy of the input model."""

    dense: nn.Module
    train: Any
    val: Any
    example_input: torch.Tensor
    out_dir: Path | None
    resume: bool
    progress: bool
    factory: Callable[[], nn.Module] | None = None  # rebuilds a non-zoo model for save/load
    # The model right after the last removal step, before and after its BatchNorm re-estimation
    # (compress scores both for the report's "pruned" rows).
    removal: tuple[nn.Module, nn.Module | None] | None = None

    def removal_step(self, name: str, model: nn.Module, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a removal step (``run()`` edits ``model`` in place, returns its info) once: its edits
        and info are kept in ``out_dir/name/removal.json``, and a resumed run re-applies them instead
        of searching again (a latency target's measured search could pick other widths)."""
        done = len(get_structure(model) or ())

        def cut() -> dict[str, Any]:
            info = run()
            log = get_structure(model) or StructureLog()
            return {"edits": log.edits[done:], "input_shape": log.input_shape, "info": info}

        rec = self.decided(name, cut, "removal.json")
        if rec["edits"] and len(get_structure(model) or ()) == done:  # read back on resume: redo the cut
            extend(model, StructureLog(rec["edits"], rec.get("input_shape")))
        return rec["info"]

    def decided(self, name: str, decide: Callable[[], dict[str, Any]], file: str = "decision.json"
                ) -> dict[str, Any]:
        """``decide()`` once per run: kept in ``out_dir/name/file`` and read back on resume (a search
        that measured latency, or scored candidates, must not pick again)."""
        path = None if self.out_dir is None else self.out_dir / name / file
        if path is not None and self.resume and path.is_file():
            return json.loads(path.read_text())
        rec = decide()
        if path is not None and is_main_process():
            write_json(path, rec)
        return rec

    def recalibrate(self, model: nn.Module, recipe: Any, before: nn.Module | None = None,
                    seed: int | None = None) -> dict[str, Any]:
        """A removal step's BatchNorm re-estimation (``recipe.recal_batches`` training batches, in the
        order of ``seed``, default the fine-tune's; of the BatchNorms whose input changed since
        ``before``, all without it), remembered for the report."""
        cfg = recal_config(recipe)
        pre = copy.deepcopy(model)
        cfg = cfg if seed is None else replace(cfg, seed=seed)
        rep, flops = compute.counted(recalibrate_norms, model, self.train, cfg, before)
        compute.add(flops)  # its forward passes are training compute (issue 36)
        self.removal = (pre.eval(), copy.deepcopy(model).eval() if rep.norms else None)
        return rep.as_dict()

    def stage_dir(self, name: str) -> Path | None:
        """Sub-directory of out_dir for one stage (checkpoints), or None when not saving."""
        return None if self.out_dir is None else self.out_dir / name

    def resumable(self, name: str) -> bool:
        """True when resuming and this stage left a checkpoint behind."""
        d = self.stage_dir(name)
        return self.resume and d is not None and (d / "checkpoint.pt").is_file()

    def with_progress(self, cfg: TrainConfig, label: str = "") -> TrainConfig:
        """The stage's TrainConfig with this run's progress setting and the stage's name for logs."""
        return replace(cfg, progress=self.progress and cfg.progress, label=label or cfg.label)
