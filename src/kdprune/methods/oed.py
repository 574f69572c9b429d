"""OED (Wang, Lin, Xie, Lin, IEEE Access 2019, "Pruning blocks for CNN compression and
acceleration via online ensemble distillation"), read as in shared/methods/oed.md: a scalar soft
mask on every residual branch of K replicas of the pretrained model, driven to exact zeros by
FISTA (kdprune.training.prox); an online teacher whose features average (or gate) the replicas'
penultimate features, with its own classifier; all trained together in one cycle with
``sum_k CE(z_k) + CE(z_T) + alpha * sum_k T^2 KL(z_T || z_k)``. At the end the replica with the
best accuracy on a split held out from the training set is kept, its surviving masks folded into
the branch ends and its zero-mask blocks removed physically (``remove_block``, in the structure
log). A target is met by also removing the blocks of least total mask whose costs (measured by
the budget service's meter: FLOPs, params, or latency predicted by the per-layer table) sum to it;
a latency target is then checked end to end and refitted with the measured/predicted correction.

This module is where the engine (block masks, removal, budget) and distill (KD loss) meet.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from kdprune.distill import kd_loss
from kdprune.engine import (
    TOLERANCE,
    AdaptiveBN,
    BudgetError,
    BudgetMeter,
    LatencyCheck,
    Target,
    adaptive_bn_score,
    apply_edit,
    attach_block_masks,
    fold_block_masks,
    mask_sites,
    verify_latency,
)
from kdprune.methods.base import RECAL_BATCHES, CompressContext, check_recal_batches, latency_info
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.metrics import Backend, complexity
from kdprune.training import SGD, Step, TrainConfig, evaluate, train
from kdprune.training.callbacks import Callback, LoopState
from kdprune.registry import check_choice_fields, choice
from kdprune.training.prox import FistaL1

__all__ = ["OED", "LeastMask", "BlockSelection", "adaptive_bn_judge", "OEDNet", "OEDTask", "BlockCommit", "block_costs",
           "commit_goal", "default_cycle", "select_blocks", "choose_blocks", "finish"]

RECIPE_VERSION = 2  # 2: blocks committed during the cycle for a target


def default_cycle() -> TrainConfig:
    """GAL's schedule shape (SGD 0.01, wd 2e-4, x0.1 step decays) at a CPU-sized length."""
    return TrainConfig(epochs=10, optimizer=SGD(lr=0.01, weight_decay=2e-4), schedule=Step(milestones=(0.5, 0.75)))


@choice("least-mask")
@dataclass(frozen=True)
class LeastMask:
    """OED's block set for a target: of the sets of whole blocks that meet it, the least total mask."""


#: How BlockCommit picks among the block sets near a target: the least total mask, or (AdaptiveBN) the
#: best adaptive-BN score of the ``1 + candidates`` least-mask sets (EagleEye, Li et al. 2020).
BlockSelection = Union[LeastMask, AdaptiveBN]


@register_recipe("oed")
@dataclass(frozen=True)
class OED:
    """OED (Wang et al., IEEE Access 2019): FISTA block masks on K replicas, online ensemble
    teacher, one training cycle (``finetune``), zero-mask blocks removed."""

    replicas: int = 3  # K networks trained together, their ensemble the online teacher
    lam: float = 0.02  # L1 weight of the masks, applied by the prox step only
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None  # of the measured latency at latency_batch on latency_backend
    latency_batch: int = 1
    latency_backend: Backend = Backend.EAGER
    finetune: TrainConfig = field(default_factory=default_cycle)  # the one training cycle
    temperature: float = 3.0  # KD softmax temperature
    alpha: float = 1.0  # weight of the KD term from the ensemble
    mask_lr: float | None = None  # None: the weights' learning rate (scaled by the schedule)
    restart_on_decay: bool = True  # restart FISTA's momentum when the lr steps down
    gated: bool = False  # teacher features: learned softmax weights over replicas, not the mean
    # Identical replicas get identical gradients and never diverge (the ensemble would be one
    # network): replicas 1..K-1 start with seeded Gaussian noise of this std relative to each
    # weight tensor's std (ours; the paper does not say how its replicas differ).
    perturb: float = 0.02
    select_val: int = 5000  # training images held out to pick the best replica (never the test set)
    # With a target (ours; the paper steers sparsity by lam alone): at ``commit_at`` of the cycle,
    # or as soon as the zero masks reach the target, each replica fixes the least-mask blocks
    # that meet it; those masks ramp linearly to 0 over ``ramp`` of the cycle and the other
    # masks stop shrinking (lam 0), so the rest of the cycle trains the network without them.
    commit_at: float = 0.25
    ramp: float = 0.15  # fraction of the cycle over which committed block masks ramp to 0
    # adaptive-bn: score the least-mask block sets by their BN-re-estimated held-out top-1 (EagleEye)
    select: BlockSelection = LeastMask()
    recal_batches: int = RECAL_BATCHES  # BN statistics re-estimated after the blocks go (0: off)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.lam < 0 or self.temperature <= 0 or self.alpha < 0:
            raise ValueError("OED needs replicas >= 1, lam >= 0, temperature > 0 and alpha >= 0")
        if self.mask_lr is not None and self.mask_lr <= 0:
            raise ValueError(f"OED.mask_lr must be > 0, got {self.mask_lr}")
        if self.perturb < 0:
            raise ValueError(f"OED.perturb must be >= 0, got {self.perturb}")
        if not (0 <= self.commit_at < 1 and 0 <= self.ramp <= 1 - self.commit_at):
            raise ValueError("OED needs 0 <= commit_at < 1 and 0 <= ramp <= 1 - commit_at")
        if self.select_val < 1:
            raise ValueError("OED.select_val must be >= 1: the best replica is chosen on held-out training images")
        check_choice_fields(self)
        check_recal_batches(self)
        self.target()  # validates: at most one target fraction, in (0, 1)

    def target(self) -> Target | None:
        """The engine Target, or None when lam alone decides which blocks go."""
        if all(v is None for v in (self.target_flops, self.target_params, self.target_latency)):
            return None
        return Target(flops=self.target_flops, params=self.target_params, latency=self.target_latency,
                      latency_batch=self.latency_batch, latency_backend=self.latency_backend)


def _classifier(model: nn.Module) -> nn.Module:
    name = getattr(model, "classifier_name", None)
    if name:
        return model.get_submodule(name)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"OED needs a linear classifier on {type(model).__name__} (its input are the features "
                         "the teacher ensembles)")
    return linears[-1]


@torch.no_grad()
def _perturb(model: nn.Module, rel_std: float, seed: int) -> None:
    """Add N(0, (rel_std * std(W))^2) to every conv/linear weight, from its own generator."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.weight.numel() > 1:
            noise = torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype)
            m.weight.add_(noise.to(m.weight.device) * (rel_std * float(m.weight.std())))


class OEDNet(nn.Module):
    """K masked replicas of one network plus the online teacher head (and optional gate)."""

    def __init__(self, model: nn.Module, sites: dict[str, str], replicas: int, gated: bool,
                 perturb: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.sites = dict(sites)
        self.replicas = nn.ModuleList(copy.deepcopy(model) for _ in range(replicas))
        for k, r in enumerate(self.replicas):
            if k and perturb:
                _perturb(r, perturb, seed * 1000 + k)
        self.masks = nn.Parameter(torch.ones(replicas, len(sites)))
        self.head = copy.deepcopy(_classifier(model))  # starts as the replicas' own classifier
        self.gate = nn.Parameter(torch.zeros(replicas)) if gated else None
        self._feats: list[Tensor | None] = [None] * replicas
        self.hooks = [attach_block_masks(r, self.sites, self._values(k)) for k, r in enumerate(self.replicas)]
        self.taps = [_classifier(r).register_forward_pre_hook(self._tap(k)) for k, r in enumerate(self.replicas)]

    def _values(self, k: int):
        return lambda: self.masks[k]

    def _tap(self, k: int):
        def grab(mod: nn.Module, args: tuple) -> None:
            self._feats[k] = args[0]
        return grab

    def forward_all(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Every replica's logits and the teacher's (over the ensembled penultimate features)."""
        logits = [r(x) for r in self.replicas]
        feats = torch.stack(self._feats, 0)
        self._feats = [None] * len(self.replicas)
        w = torch.softmax(self.gate, 0) if self.gate is not None else torch.full_like(feats[:, 0, 0], 1 / len(logits))
        return logits, self.head(torch.einsum("k,k...->...", w, feats))

    def forward(self, x: Tensor) -> Tensor:
        """The teacher's logits (what evaluation scores as the main model)."""
        return self.forward_all(x)[1]

    def replica_copy(self, k: int) -> nn.Module:
        """A copy of replica ``k`` on the CPU without the mask and feature hooks (its masks unapplied)."""
        self.hooks[k].remove()
        self.taps[k].remove()
        try:
            return copy.deepcopy(self.replicas[k]).cpu()
        finally:  # same hooks back (the only ones on those modules: their order is unchanged)
            self.hooks[k] = attach_block_masks(self.replicas[k], self.sites, self._values(k))
            self.taps[k] = _classifier(self.replicas[k]).register_forward_pre_hook(self._tap(k))

    def detach_hooks(self) -> None:
        """Remove the mask and feature hooks (the replicas compute their unmasked functions again)."""
        for h in self.hooks:
            h.remove()
        for t in self.taps:
            t.remove()


@dataclass(eq=False)
class OEDTask:
    """OED's loss: sum_k CE(y, z_k) + CE(y, z_T) + alpha * sum_k T^2 KL(z_T || z_k) (the teacher
    learns from the labels only: its logits are detached in the KD terms)."""

    temperature: float = 3.0
    alpha: float = 1.0
    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(teacher logits, {"ce": replicas' CE, "ce_teacher", "kd"})."""
        net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        logits, teacher = net.forward_all(x)
        ce = sum(F.cross_entropy(z, y, label_smoothing=self.label_smoothing) for z in logits)
        kd = sum(kd_loss(z, teacher, self.temperature) for z in logits)
        return teacher, {"ce": ce, "ce_teacher": F.cross_entropy(teacher, y, label_smoothing=self.label_smoothing),
                         "kd": self.alpha * kd}

    def modules(self) -> list[nn.Module]:
        """No networks besides the trained bundle."""
        return []

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The teacher as the main score, and each masked replica (``val_replica{k}_top1``)."""
        return {"": model, **{f"replica{k}": r for k, r in enumerate(model.replicas)}}


def _removal(model: nn.Module, x: Tensor, blocks: frozenset[str]) -> None:
    for b in sorted(blocks):
        apply_edit(model, {"op": "remove_block", "module": b}, x)


def select_blocks(model: nn.Module, x: Tensor, sites: dict[str, str], values: Tensor,
                  target: Target | None) -> frozenset[str]:
    """Blocks to remove: every zero-mask block and, for a target, the other blocks of least total
    mask whose removal lands within 1% of it (see ``choose_blocks``)."""
    return choose_blocks(model, x, sites, values, target)[0]


def choose_blocks(model: nn.Module, x: Tensor, sites: dict[str, str], values: Tensor, target: Target | None
                  ) -> tuple[frozenset[str], LatencyCheck | None]:
    """``select_blocks`` and, for a latency target, its end-to-end check: each block's cost is
    measured once by the budget service's meter; removal costs add up, so a subset-sum search finds
    the set; the chosen set is measured again physically (latency: end to end, refitted with the
    measured/predicted correction when it misses by more than 5%)."""
    names = list(sites)
    zero = frozenset(b for b, v in zip(names, values.tolist()) if v == 0.0)
    if target is None:
        return zero, None
    meter: BudgetMeter[frozenset[str]] = BudgetMeter(model, x, target, apply=_removal)
    mask = dict(zip(names, values.tolist()))
    if meter.latency is None:
        return _pick(meter, zero, names, mask), None
    best, check = verify_latency(meter, lambda: meter.measure(_pick(meter, zero, names, mask)),
                                 limits=" with whole blocks", advice="; use another target or lam alone")
    return best.candidate, check


def _pick(meter: BudgetMeter[frozenset[str]], zero: frozenset[str], names: list[str], mask: dict[str, float]
          ) -> frozenset[str]:
    """The least-mask set of blocks (with every zero-mask one) that the meter says meets the target."""
    target, tol = meter.target, meter.target.tolerance
    base, goal = meter.kept(zero), target.value
    if base < goal - tol:
        raise BudgetError(f"OED: the {len(zero)} blocks whose masks reached 0 already leave {base:.4f} of "
                          f"{target.metric}, below the target {goal}: lower lam", None)
    cost = {b: base - meter.kept(zero | {b}) for b in names if b not in zero}
    for extra in _subsets_near(cost, mask, base - goal, tol):
        cand = zero | extra
        if abs(meter.kept(cand) - goal) <= tol:
            return cand
    reach = sorted({round(base - sum(cost[b] for b in c), 4) for c in _subsets_near(cost, mask, base - goal, 1.0)})
    how = " (predicted)" if meter.latency is not None else ""
    raise BudgetError(f"OED: no set of whole blocks keeps {goal} of {target.metric} within {tol:.0%} "
                      f"(nearest reachable{how}: {reach[:6]}); use another target or lam alone", None)


def _subsets_near(cost: dict[str, float], mask: dict[str, float], need: float, window: float = TOLERANCE,
                  limit: int = 20) -> list[frozenset[str]]:
    """Up to ``limit`` subsets whose summed cost is within ``window`` of ``need``, least total mask
    first (a dynamic programme over costs rounded to 1/2000 of the dense model that keeps the
    ``limit`` least-mask subsets of each cost: blocks of one stage cost the same, and a judge of
    the sets needs more than the least-mask one of them)."""
    res = 1 / 2000
    best: dict[int, list[tuple[float, frozenset[str]]]] = {0: [(0.0, frozenset())]}
    for b, c in cost.items():
        step = round(c / res)
        for k, subs in list(best.items()):
            grown = best.get(k + step, []) + [(m + mask[b], sub | {b}) for m, sub in subs]
            best[k + step] = sorted(grown, key=lambda t: (t[0], sorted(t[1])))[:limit]
    near = [t for k, subs in best.items() if abs(k * res - need) <= window for t in subs]
    return [sub for _, sub in sorted(near, key=lambda t: (t[0], sorted(t[1])))][:limit]


def check_block_target(costs: dict[str, float], goal: float, tolerance: float, metric: str) -> None:
    """ValueError before any training, naming the nearest kept fractions whole blocks reach, when no
    set of blocks keeps ``goal`` within ``tolerance`` (was: found at the commit, mid-cycle)."""
    if _subsets_near(costs, dict.fromkeys(costs, 1.0), 1.0 - goal, tolerance, limit=1):
        return
    res, sums = 1 / 2000, {0}
    for c in costs.values():
        sums |= {k + round(c / res) for k in sums}
    kept = sorted({round(1.0 - k * res, 4) for k in sums})
    below, above = [k for k in kept if k < goal], [k for k in kept if k > goal]
    near = ", ".join(f"{k:g}" for k in (below[-1:] + above[:1]))
    raise ValueError(f"OED: no set of whole blocks keeps {goal:g} of the {metric} within {tolerance:.0%}; the "
                     f"nearest reachable fractions are {near}: give one of them, or use a channel method")


def finish(net: OEDNet, recipe: OED, x: Tensor, held: Any, eval_cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """Keep the best replica on the held-out split, fold its surviving masks, remove its
    zero-mask (and, for a target, lowest-mask) blocks physically."""
    net.cpu()
    accs = [evaluate(r, held, batch_size=eval_cfg.eval_batch_size, device="cpu")["top1"] for r in net.replicas]
    k = max(range(len(accs)), key=lambda i: (accs[i], -i))
    values = net.masks[k].detach().clone()
    net.detach_hooks()
    model = net.replicas[k]
    removed, check = choose_blocks(model, x, net.sites, values, recipe.target())
    for i, b in enumerate(net.sites):
        if b in removed:
            values[i] = 0.0
    dense = complexity(model, example_input=x)
    fold_block_masks(model, net.sites, values, x)
    after = complexity(model, example_input=x)
    return model, {"replica_val_top1": accs, "selected_replica": k, "masks": net.masks.detach().tolist(),
                   "removed_blocks": [b for b in net.sites if b in removed],
                   "zero_mask_blocks": int((net.masks[k] == 0).sum()),
                   "flops_kept": after.flops / dense.flops, "params_kept": after.params / dense.params,
                   **latency_info(check)}


class BlockCommit(Callback):
    """For a target: per replica, fix the blocks to remove during the cycle (at ``commit_at`` of
    its steps, or once the zero masks alone reach the target), ramp their masks linearly to 0 over
    ``ramp`` of the steps and stop shrinking the others (their lam -> 0 in ``fista``)."""

    def __init__(self, fista: FistaL1, masks: nn.Parameter, costs: dict[str, float], goal: float,
                 commit_at: float, ramp: float, tolerance: float = TOLERANCE,
                 judge: Callable[[int, list[frozenset[str]]], list[float]] | None = None, judged: int = 1) -> None:
        self.fista, self.masks, self.names = fista, masks, list(costs)
        self.costs, self.goal, self.commit_at, self.ramp = costs, goal, commit_at, ramp
        self.tolerance, self.judge, self.judged = tolerance, judge, judged
        self.scores: list[list[dict[str, Any]] | None] = [None] * masks.shape[0]  # the judge's, per replica
        self.chosen: list[list[str] | None] = [None] * masks.shape[0]
        self.start: list[Tensor | None] = [None] * masks.shape[0]  # mask values at commit
        self.at = [0] * masks.shape[0]  # step of the commit

    def _kept(self, blocks: Sequence[str]) -> float:
        return 1.0 - sum(self.costs[b] for b in blocks)  # removal costs add up (see select_blocks)

    def _commit(self, k: int, step: int) -> None:
        mask = dict(zip(self.names, self.masks[k].tolist()))
        near = _subsets_near(self.costs, mask, 1.0 - self.goal, self.tolerance)
        if not near:
            raise ValueError(f"OED: no set of whole blocks keeps {self.goal} within {self.tolerance:.0%}")
        pick = near[0]
        if self.judge is not None:  # the first of equal scores: the least-mask set wins ties
            sets = near[:self.judged]
            top1 = self.judge(k, sets)
            pick = sets[max(range(len(sets)), key=lambda i: (top1[i], -i))]
            self.scores[k] = [{"blocks": sorted(s), "top1": t} for s, t in zip(sets, top1)]
        self.chosen[k], self.start[k], self.at[k] = sorted(pick), self.masks[k].detach().clone(), step
        lam = self.fista.lams[0]
        lam = lam.clone() if isinstance(lam, Tensor) else torch.full_like(self.masks, lam)
        lam[k] = 0.0  # the kept blocks stop shrinking; the chosen ones follow the ramp below
        self.fista.set_lam(lam)

    @torch.no_grad()
    def on_optimizer_step(self, state: LoopState) -> None:
        """After FISTA's step: commit where due, then hold the chosen masks under their ramp."""
        total = state.steps_per_epoch * state.epochs
        for k in range(self.masks.shape[0]):
            zeros = [b for b, v in zip(self.names, self.masks[k].tolist()) if v == 0.0]
            if self.chosen[k] is None and (state.step >= self.commit_at * total
                                           or self._kept(zeros) <= self.goal + self.tolerance):
                self._commit(k, state.step)
            if self.chosen[k] is not None:
                frac = 1.0 - (state.step - self.at[k]) / max(1.0, self.ramp * total)
                idx = [self.names.index(b) for b in self.chosen[k]]
                cap = self.start[k][idx] * max(0.0, frac)
                self.masks[k, idx] = torch.minimum(self.masks[k, idx], cap.to(self.masks.device))

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "at": self.at, "scores": self.scores,
                "start": [s.clone() if s is not None else None for s in self.start]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chosen, self.at = [list(c) if c is not None else None for c in state["chosen"]], list(state["at"])
        self.scores = list(state.get("scores", self.scores))
        self.start = [s.clone() if s is not None else None for s in state["start"]]


def adaptive_bn_judge(net: OEDNet, x: Tensor, train: Any, held: Any, sel: AdaptiveBN
                      ) -> Callable[[int, list[frozenset[str]]], list[float]]:
    """BlockCommit's judge: for replica ``k``, each block set's adaptive-BN score (EagleEye, Li et al.
    2020): the replica's masks folded, the set (and every zero-mask block) removed, its BatchNorms
    re-estimated on ``train``, its top-1 on ``sel.images`` of the ``held`` images."""
    names = list(net.sites)

    def judge(k: int, sets: list[frozenset[str]]) -> list[float]:
        base, values = net.replica_copy(k), net.masks[k].detach().cpu()
        out = []
        for s in sets:
            m, v = copy.deepcopy(base), values.clone()
            v[[names.index(b) for b in s]] = 0.0
            fold_block_masks(m, net.sites, v, x.cpu())
            out.append(adaptive_bn_score(m, train, held, sel))
        return out
    return judge


def block_costs(model: nn.Module, x: Tensor, sites: dict[str, str], target: Target) -> dict[str, float]:
    """Each block's removal cost (fraction of the dense metric), measured on an edited copy."""
    meter: BudgetMeter[frozenset[str]] = BudgetMeter(model, x, target, apply=_removal)
    return {b: 1.0 - meter.kept(frozenset({b})) for b in sites}


def commit_goal(model: nn.Module, x: Tensor, sites: dict[str, str], target: Target) -> float:
    """The kept fraction BlockCommit aims for with ``block_costs``: the target's, or for latency
    the predicted one that the measured/predicted correction, found by a block set meeting the
    target end to end, maps onto the target (so an unreachable latency target fails before
    the cycle, not after it)."""
    if target.latency is None:
        return target.value
    meter: BudgetMeter[frozenset[str]] = BudgetMeter(model, x, target, apply=_removal)
    names = list(sites)
    verify_latency(meter, lambda: meter.measure(_pick(meter, frozenset(), names, dict.fromkeys(names, 1.0))),
                   limits=" with whole blocks", advice="; use another target or lam alone")
    return meter.predicted_goal()  # BlockCommit sums the raw (uncorrected) costs


def _held_out(train_set: Any, n: int, seed: int) -> tuple[Any, Any]:
    n = min(n, max(1, len(train_set) // 5))  # small (test) sets: at most a fifth held out
    if hasattr(train_set, "split"):  # an ImageDataset: stratified
        return train_set.split(n, seed=seed)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))  # any torch Dataset
    return Subset(train_set, order[n:].sort().values.tolist()), Subset(train_set, order[:n].sort().values.tolist())


@run_recipe.register
def _(recipe: OED, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    x = ctx.example_input
    sites = mask_sites(model, x)
    train_set, held = _held_out(ctx.train, recipe.select_val, recipe.finetune.seed)
    net = OEDNet(model, sites, recipe.replicas, recipe.gated, recipe.perturb, recipe.finetune.seed)
    scale = recipe.mask_lr / recipe.finetune.optimizer.lr if recipe.mask_lr is not None else 1.0
    fista = FistaL1([net.masks], recipe.lam, scale, recipe.restart_on_decay)
    task = OEDTask(recipe.temperature, recipe.alpha, recipe.finetune.label_smoothing)
    callbacks: list[Callback] = [fista]
    target = recipe.target()
    if target is not None:  # after FISTA's step, so the ramp caps what FISTA produced
        costs, goal = block_costs(model, x, sites, target), commit_goal(model, x, sites, target)
        check_block_target(costs, goal, target.tolerance, target.metric)
        sel = recipe.select
        judge = adaptive_bn_judge(net, x, train_set, held, sel) if isinstance(sel, AdaptiveBN) else None
        callbacks.append(BlockCommit(fista, net.masks, costs, goal, recipe.commit_at, recipe.ramp, target.tolerance,
                                     judge, 1 + sel.candidates if judge is not None else 1))
    res = train(net, train_set, held, ctx.with_progress(recipe.finetune, "oed"), task=task,
                out_dir=ctx.stage_dir("oed"), resume=ctx.resumable("oed"), callbacks=callbacks,
                record={"method": "oed"}, save_model=False)
    pruned, info = finish(net, recipe, x.cpu(), held, recipe.finetune)
    info["recalibration"] = ctx.recalibrate(pruned, recipe)  # masks folded, blocks gone: every BN
    info.update(held_out=len(held), fista_restarts=fista.restarts, train=res.history)
    if len(callbacks) > 1:
        info.update(committed_blocks=callbacks[1].chosen, committed_at_step=callbacks[1].at)
        if callbacks[1].judge is not None:
            info["adaptive_bn"] = callbacks[1].scores
    return pruned, info
