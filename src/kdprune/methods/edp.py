"""EDP (Ruan et al., IEEE TNNLS 2020, "EDP: An Efficient Decomposition and Pruning Scheme for
Convolutional Neural Network Compression"), read as in shared/methods/edp.md: every selected conv
becomes a compression-aware block, a basis conv B then a 1x1 coefficient conv A (B = W, A = I, so
the function is unchanged); one training stage with the group-lasso prox on A's columns (a zero
column drops a basis filter: the rank) and rows (a zero row drops an output channel, with every
layer coupled to it); then Pruning & Merging: the smallest groups go until the target is met
(measured on the merged model), a fine-tune, and each block merged back into one conv A B where
the rule says that is cheaper. Decomposition, pruning and merging are edits in the structure log.

KD from the dense model (``kd_alpha > 0``) is our extension, off by default. This module is where
the engine (edits, groups, budget) and distill (the KD task) meet.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from kdprune.distill import KDTask
from kdprune.engine import (
    Allocation,
    BudgetMeter,
    ChannelGroup,
    DecomposedConv,
    Global,
    MeasuredWidths,
    PruningPlan,
    RoundTo,
    apply_edit,
    apply_plan,
    channel_groups,
    decomposed_convs,
    L1,
    fit_budget,
    importance_scores,
    merge_is_cheaper,
    plan_pruning,
)
from kdprune.engine.budget import Bisection
from kdprune.methods.base import CompressContext, PruneRecipe, ignored_names, latency_info, width_floor
from kdprune.metrics import Complexity, complexity
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.registry import choice
from kdprune.training import SGD, Callback, Cosine, TrainConfig, train
from kdprune.training.prox import GroupLassoProx, GroupSlices
from kdprune.utils.forward import probe_forward

__all__ = ["EDP", "Coefficients", "BNScaled", "UnitBasis", "Conv3x3", "AllConvs", "Named", "MergeByFlops",
           "MergeByLatency", "edp_families", "merge_decisions", "default_sparse_stage"]


@choice("conv3x3")
@dataclass(frozen=True)
class Conv3x3:
    """Every ungrouped 3x3 Conv2d (the notes' default)."""

    def select(self, model: nn.Module) -> list[str]:
        """Names of the convs to decompose."""
        return [n for n, m in model.named_modules()
                if type(m) is nn.Conv2d and m.groups == 1 and tuple(m.kernel_size) == (3, 3)]


@choice("convs")
@dataclass(frozen=True)
class AllConvs:
    """Every ungrouped Conv2d, 1x1 included."""

    def select(self, model: nn.Module) -> list[str]:
        """Names of the convs to decompose."""
        return [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1]


@choice("named")
@dataclass(frozen=True)
class Named:
    """The convs named here (by the original model's names)."""

    names: tuple[str, ...] = ()

    def select(self, model: nn.Module) -> list[str]:
        """The names, checked to be ungrouped Conv2d modules."""
        mods = dict(model.named_modules())
        bad = [n for n in self.names if type(mods.get(n)) is not nn.Conv2d or mods[n].groups != 1]
        if bad:
            raise ValueError(f"EDP layers: {bad} are not ungrouped nn.Conv2d modules of {type(model).__name__}")
        return list(self.names)


LayerSelector = Union[Conv3x3, AllConvs, Named]


@choice("flops")
@dataclass(frozen=True)
class MergeByFlops:
    """EDP's rule: merge when r (k^2 C_in + C_out) >= k^2 C_in C_out (FLOPs and params alike)."""

    def merge(self, block: DecomposedConv, input_shape: tuple[int, ...]) -> bool:
        """Whether the merged conv is cheaper."""
        return merge_is_cheaper(block)


_LATENCY_CACHE: dict[tuple, bool] = {}


@choice("latency")
@dataclass(frozen=True)
class MergeByLatency:
    """Merge when one conv A B is faster than the two thin layers, measured on this machine at
    ``batch`` (median of ``rounds`` interleaved timings; cached per layer shape in the process)."""

    batch: int = 1
    rounds: int = 15
    threads: int = 1

    @torch.no_grad()
    def merge(self, block: DecomposedConv, input_shape: tuple[int, ...]) -> bool:
        """Whether the merged conv runs faster than basis + coeff."""
        b = block.basis
        key = (self, b.in_channels, block.rank, block.out_channels, b.kernel_size, b.stride, b.padding,
               tuple(input_shape[1:]))
        if key not in _LATENCY_CACHE:
            two, one = block.eval(), block.to_conv().eval()
            x = torch.randn(self.batch, *input_shape[1:])
            prev = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            times: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(self.rounds):
                for i, m in enumerate((two, one)):  # interleaved: bursts of noise hit both
                    start = time.perf_counter()
                    m(x)
                    times[i].append(time.perf_counter() - start)
            torch.set_num_threads(prev)
            _LATENCY_CACHE[key] = statistics.median(times[1]) < statistics.median(times[0])
        return _LATENCY_CACHE[key]


MergeRule = Union[MergeByFlops, MergeByLatency]


@choice("coefficients")
@dataclass(frozen=True)
class Coefficients:
    """The paper's groups: A's columns (rank) and A's rows (output channels), ranked at the end by
    what each adds to its layers' outputs (``contribution``)."""


@choice("bn-scaled")
@dataclass(frozen=True)
class BNScaled:
    """Ours (docs/methods/edp.md): a row group is the (gamma, beta) of the BatchNorm after A's rows,
    the output scale that BatchNorm cannot undo (A's row norm it undoes exactly); a column group is
    A's column with B's filters held at unit norm (``UnitBasis``), so B cannot absorb its shrinkage.
    The group norms the sparse stage leaves are the ranking: it, not a post-hoc norm, decides."""


#: Which parameters EDP's group lasso acts on.
EDPPenalty = Union[Coefficients, BNScaled]


class UnitBasis(Callback):
    """After every optimiser step (before the prox), each basis filter B_j scaled to unit norm and
    A's column j by its old norm: A B is unchanged, and ||A[:, j]|| is then the filter's whole scale."""

    def __init__(self, blocks: list[DecomposedConv]) -> None:
        self.blocks = blocks

    @torch.no_grad()
    def on_optimizer_step(self, state: Any = None) -> None:
        """Move every basis filter's norm into its coefficient column."""
        for b in self.blocks:
            norm = b.basis.weight.flatten(1).norm(dim=1).clamp_min(1e-12)
            b.basis.weight.div_(norm.view(-1, 1, 1, 1))
            b.coeff.weight.mul_(norm.view(1, -1, 1, 1))


def default_sparse_stage() -> TrainConfig:
    """The one sparsity stage (group prox on the coefficients): 3 epochs of SGD 0.01, cosine."""
    return TrainConfig(epochs=3, optimizer=SGD(lr=0.01), schedule=Cosine())


@register_recipe("edp")
@dataclass(frozen=True)
class EDP(PruneRecipe):
    """EDP (Ruan et al., TNNLS 2020): decompose, group-sparse coefficients in one stage (``sparse``),
    prune the smallest groups to the target, fine-tune (``finetune``), merge where cheaper."""

    lam_col: float = 0.05  # group lasso on A's columns (rank)
    lam_row: float = 0.05  # group lasso on A's rows (output channels, with their coupled layers)
    sparse: TrainConfig = field(default_factory=default_sparse_stage)
    layers: LayerSelector = Conv3x3()  # which convs are decomposed into basis + coefficients
    merge: MergeRule = MergeByFlops()  # when a pruned pair is merged back into one conv
    mode: Allocation = Global()  # smallest mean-normalised group norms over all layers go first
    penalty: EDPPenalty = Coefficients()  # coefficients: A's rows/columns (the paper); bn-scaled (ours)
    kd_alpha: float = 0.0  # ours: KD from the dense model in both stages; 0 = the paper (CE only)
    temperature: float = 4.0  # KD softmax temperature

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam_col < 0 or self.lam_row < 0:
            raise ValueError(f"EDP needs lam_col, lam_row >= 0, got {self.lam_col}, {self.lam_row}")
        if not 0.0 <= self.kd_alpha <= 1.0 or self.temperature <= 0:
            raise ValueError("EDP needs 0 <= kd_alpha <= 1 and temperature > 0")
        if isinstance(self.widths, MeasuredWidths):
            raise ValueError("EDP does not support widths=MeasuredWidths(...) (it prunes rank and rows of "
                             "decomposed layers); use round_to or FreeWidths()")


def _aligned(group: ChannelGroup, member_name: str, role: str) -> torch.Tensor:
    """Local channel of ``member_name`` for each root channel 0..C-1 of ``group``."""
    m = next(m for m in group.members if m.name == member_name and m.role == role)
    local = dict(zip(m.root_idxs, m.idxs))
    return torch.tensor([local[r] for r in range(group.channels)], dtype=torch.long)


def _bn_rows(model: nn.Module, group: ChannelGroup, lam: float) -> GroupSlices | None:
    """The (gamma, beta) of every affine BatchNorm normalising ``group``'s channels, one L2 group per
    channel; None unless each of its coefficient convs is followed by one."""
    bns = [m.name for m in group.members if m.kind == "bn" and m.role == "out"]
    mods = [model.get_submodule(n) for n in bns]
    coeffs = [m for m in group.producers if m.kind != "bn"]
    if not bns or len(bns) < len(coeffs) or any(getattr(m, "weight", None) is None for m in mods):
        return None
    params = tuple(p for m in mods for p in (m.weight, m.bias))
    index = tuple(i for n in bns for i in (_aligned(group, n, "out"),) * 2)
    return GroupSlices(params, (0,) * len(params), index, lam)


def edp_families(model: nn.Module, groups: list[ChannelGroup], lam_col: float, lam_row: float,
                 penalty: EDPPenalty = Coefficients()) -> dict[str, GroupSlices]:
    """Group root -> its group-lasso family: the rank group of each block (A's columns) and every
    output-channel group whose weighted producers are all coefficient convs (A's rows, the coupled
    rows of a residual stream together; ``BNScaled``: the BatchNorms' (gamma, beta) after them);
    groups with another producer get none (notes: outputs feeding a residual add are pruned only as
    a whole coupled group)."""
    blocks = {f"{n}.coeff": n for n in decomposed_convs(model)}
    out: dict[str, GroupSlices] = {}
    for g in groups:
        if g.root.endswith(".basis") and g.root[: -len(".basis")] in blocks.values():
            coeff = f"{g.root[: -len('.basis')]}.coeff"
            out[g.root] = GroupSlices((model.get_submodule(coeff).weight,), (1,), (_aligned(g, coeff, "in"),), lam_col)
            continue
        weighted = [m for m in g.producers if m.kind != "bn"]
        if weighted and all(m.name in blocks for m in weighted):
            rows = _bn_rows(model, g, lam_row) if isinstance(penalty, BNScaled) else None
            if rows is not None:
                out[g.root] = rows
                continue
            names = [m.name for m in weighted]
            out[g.root] = GroupSlices(tuple(model.get_submodule(n).weight for n in names), (0,) * len(names),
                                      tuple(_aligned(g, n, "out") for n in names), lam_row)
    return out


def _input_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    probe_forward(model, x, {n: (lambda mod, args, out, n=n: shapes.__setitem__(n, tuple(args[0].shape)))
                             for n in decomposed_convs(model)})
    return shapes


def merge_decisions(model: nn.Module, x: torch.Tensor, rule: MergeRule) -> dict[str, bool]:
    """Block name -> whether ``rule`` merges it (at its current rank and widths)."""
    shapes = _input_shapes(model, x)
    return {n: rule.merge(model.get_submodule(n), shapes[n]) for n in decomposed_convs(model)}


def _merge(model: nn.Module, x: torch.Tensor, rule: MergeRule) -> dict[str, bool]:
    decided = merge_decisions(model, x, rule)
    for n, yes in decided.items():
        if yes:
            apply_edit(model, {"op": "merge_conv", "module": n}, x)
    return decided


def contribution(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Ranking score of each channel of an EDP group (ours): the norm of what it adds to its
    layers' outputs, not of A's slice alone. Column j of a block: ||A[:, j]|| * ||B_j||; a row
    group: the joint norm of the merged filters (A B)_i over its coefficient convs. With A near
    the identity (a short sparse stage) A's slices all have norm ~1, and ranking by them alone
    removes basis filters and output rows independently, at random; here column j and row j of
    the same filter score alike, and the rows rank as L1-style filter norms of W' = A B."""
    if group.root.endswith(".basis"):
        block = model.get_submodule(group.root[: -len(".basis")])
        a, b = block.coeff.weight.detach().flatten(1), block.basis.weight.detach().flatten(1)
        cols = a.norm(dim=0)[_aligned(group, f"{group.root[: -len('.basis')]}.coeff", "in")]
        return cols * b.norm(dim=1)  # the basis is the root: its local index is the root index
    sq = torch.zeros(group.channels, dtype=torch.float64)
    for m in (m for m in group.producers if m.kind != "bn"):
        block = model.get_submodule(m.name[: -len(".coeff")])
        merged = block.coeff.weight.detach().flatten(1) @ block.basis.weight.detach().flatten(1)
        sq += merged.pow(2).sum(1).double()[_aligned(group, m.name, "out")]
    return sq.sqrt()


def _prune_to_target(model: nn.Module, recipe: EDP, x: torch.Tensor, groups: list[ChannelGroup],
                     fams: dict[str, GroupSlices], dense: Complexity, original: nn.Module | None = None
                     ) -> dict[str, Any]:
    """The smallest groups out until the model *after merging* keeps the target of the original
    model's (``dense``, ``original``) FLOPs/params/measured latency (budget service)."""
    edp_groups = [g for g in groups if g.root in fams]
    if isinstance(recipe.penalty, BNScaled):  # what the sparse stage left: the penalised norms
        scores = {g.root: fams[g.root].norms().double().cpu() for g in edp_groups}
    else:
        scores = {g.root: contribution(model, g) for g in edp_groups}
    # Groups no decomposed layer carries (a grouped conv's, issue 29: only ungrouped convs decompose) are
    # cut by their filters' L1 norms beside them (mean-normalised, so a Global rate compares the two)
    others = [g for g in groups if g.root not in fams]
    scores.update({r: v.double().cpu() for r, v in importance_scores(model, others, L1()).items()})

    def prune_and_merge(m: nn.Module, xx: torch.Tensor, plan: PruningPlan) -> None:
        apply_plan(m, xx, plan)
        _merge(m, xx, recipe.merge)

    round_to = recipe.widths.n if isinstance(recipe.widths, RoundTo) else recipe.round_to
    floor = width_floor(recipe, model)
    meter: BudgetMeter[PruningPlan] = BudgetMeter(model, x, recipe.target(), apply=prune_and_merge, dense=dense,
                                                  reference=original)
    fit = fit_budget(model, x, recipe.target(),
                     lambda r: plan_pruning(edp_groups + others, scores, r, recipe.mode, floor, round_to),
                     meter=meter, bisection=Bisection(first_within=True),
                     limits=f" with the groups of {len(fams)} coefficient families and {len(others)} other groups",
                     advice="")
    apply_plan(model, x, fit.best.candidate)
    zero = {r: int((scores[r] == 0).sum()) for r in scores}
    achieved = fit.latency.measured if fit.latency is not None else fit.best.kept
    return {"achieved": achieved, "channels_removed": fit.best.candidate.num_removed,
            "zero_groups": sum(zero.values()), "groups": sum(g.channels for g in edp_groups),
            "other_groups": len(others),
            **latency_info(fit.latency)}


def _norm_spread(fams: dict[str, GroupSlices]) -> dict[str, float]:
    """What the sparse stage left: how many groups are exactly zero, and the spread of the norms
    within a family (std / mean, averaged over families): 0 when the prox only shrank them alike."""
    norms = [f.norms().double().cpu() for f in fams.values()]
    spread = [float(n.std() / n.mean()) for n in norms if len(n) > 1 and n.mean() > 0]
    return {"zero": int(sum(int((n == 0).sum()) for n in norms)), "groups": int(sum(len(n) for n in norms)),
            "spread": sum(spread) / max(len(spread), 1)}


def _stage(model: nn.Module, cfg: TrainConfig, name: str, ctx: CompressContext, task, callbacks=()) -> list:
    res = train(model, ctx.train, ctx.val, ctx.with_progress(cfg, name), task=task, out_dir=ctx.stage_dir(name),
                resume=ctx.resumable(name), callbacks=list(callbacks), save_model=False)
    return res.history


def _widths(model: nn.Module, names: list[str], merged: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """Per original conv name: in/out channels and rank (None once merged: a plain conv again)."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        rank = m.rank if isinstance(m, DecomposedConv) else None
        out[n] = {"in": m.in_channels, "out": m.out_channels, "rank": rank, "merged": bool(merged.get(n))}
    return out


@run_recipe.register
def _(recipe: EDP, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    x = ctx.example_input
    names = recipe.layers.select(model)
    if not names:
        raise ValueError(f"EDP: no conv of {type(model).__name__} matches layers={recipe.layers}: "
                         "nothing to decompose")
    before = {n: {"in": model.get_submodule(n).in_channels, "out": model.get_submodule(n).out_channels}
              for n in names}
    dense = complexity(model, example_input=x)
    for n in names:
        apply_edit(model, {"op": "decompose_conv", "module": n}, x)
    groups = channel_groups(model, x, ignored_names(recipe, model))
    fams = edp_families(model, groups, recipe.lam_col, recipe.lam_row, recipe.penalty)
    task = KDTask(ctx.dense, recipe.temperature, recipe.kd_alpha) if recipe.kd_alpha > 0 else None
    callbacks: list[Callback] = [GroupLassoProx(list(fams.values()))]
    if isinstance(recipe.penalty, BNScaled):  # unit filters first (exact), then the prox on A's columns
        callbacks.insert(0, UnitBasis([model.get_submodule(n) for n in names]))
        callbacks[0].on_optimizer_step()
    info: dict[str, Any] = {"sparse": _stage(model, recipe.sparse, "sparse", ctx, task, callbacks)}
    info["group_norms"] = _norm_spread(fams)
    model.cpu()  # prune where the example input lives
    pre = copy.deepcopy(model)
    info["prune"] = _prune_to_target(model, recipe, x, groups, fams, dense, ctx.dense)
    info["recalibration"] = ctx.recalibrate(model, recipe, pre)  # merging later is exact: no second one
    if "latency_target" in info["prune"]:
        info["latency_target"] = info["prune"].pop("latency_target")
    info["finetune"] = _stage(model, recipe.finetune, "finetune", ctx, task)
    model.cpu()
    merged = _merge(model, x, recipe.merge)
    info.update(layers_before=before, layers=_widths(model, names, merged), merged=sum(merged.values()))
    return model, info
