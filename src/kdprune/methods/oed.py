"""OED (Wang, Lin, Xie, Lin, IEEE Access 2019, "Pruning blocks for CNN compression and
acceleration via online ensemble distillation"), read as in shared/methods/oed.md: a scalar soft
mask on every residual branch of K replicas of the pretrained model, driven to exact zeros by
FISTA (kdprune.training.prox); an online teacher whose features average (or gate) the replicas'
penultimate features, with its own classifier; all trained together in one cycle with
``sum_k CE(z_k) + CE(z_T) + alpha * sum_k T^2 KL(z_T || z_k)``. At the end the replica with the
best accuracy on the run's validation set is kept, its surviving masks folded into the branch
ends and its zero-mask blocks removed physically (``remove_block``, in the structure log). For a
target (ours) FISTA's lam grows until its zero masks meet it (``oed_blocks.FistaDecides``); a
FLOPs/params target between block counts is met by blocks, then channels trimmed and fine-tuned
with KD from the ensemble (depth + width); replicas see their own augmentation draws and
bootstrap weights, so that the ensemble has more than copies to average.

This module is where the engine (block masks, removal, budget) and distill (KD loss) meet.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from kdprune.data.transforms import Augment, apply_augment
from kdprune.distill import KDTask, kd_loss
from kdprune.engine import (AdaptiveBN, Target, adaptive_bn_score, attach_block_masks, fold_block_masks, mask_sites,
                            prune_to_target)
from kdprune.methods.base import RECAL_BATCHES, CompressContext, check_recal_batches, latency_info
from kdprune.methods.oed_blocks import (BlockCommit, FistaDecides, block_costs, check_block_target, choose_blocks,
                                        commit_goal, depth_goal, select_blocks)
from kdprune.methods.registry import register_recipe, run_recipe
from kdprune.metrics import Backend, complexity
from kdprune.registry import check_choice_fields, choice
from kdprune.training import SGD, Step, TrainConfig, evaluate, train
from kdprune.training.callbacks import Callback
from kdprune.training.prox import FistaL1

__all__ = ["OED", "LeastMask", "BlockSelection", "adaptive_bn_judge", "OEDNet", "OEDTask", "BlockCommit", "block_costs",
           "commit_goal", "default_cycle", "default_trim", "select_blocks", "choose_blocks", "finish"]

# 2: blocks committed during the cycle for a target; 3: the run's validation set picks the replica (none
# carved from the training set), replicas see their own views and bootstrap weights, depth + width targets
RECIPE_VERSION = 3


def default_cycle() -> TrainConfig:
    """GAL's schedule shape (SGD 0.01, wd 2e-4, x0.1 step decays) at a CPU-sized length."""
    return TrainConfig(epochs=10, optimizer=SGD(lr=0.01, weight_decay=2e-4), schedule=Step(milestones=(0.5, 0.75)))


def default_trim() -> TrainConfig:
    """The KD fine-tune after a channel trim (depth + width targets only): short, the cycle's shape."""
    return TrainConfig(epochs=3, optimizer=SGD(lr=0.01, weight_decay=2e-4), schedule=Step(milestones=(0.5, 0.75)))


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
    # Replicas 1..K-1 each see their own draw of the training set's augmentation of the batch (ours: the
    # online-distillation literature's diverse peers), so that the teacher ensembles views, not copies
    views: bool = True
    # Replicas 1..K-1 weight their CE by their own Poisson(1) draw per image (online bagging, Oza & Russell 2001)
    bagging: bool = True
    select_val: int = 5000  # at most this many images of the run's validation set pick the best replica
    # A target whole blocks do not reach within 1% (ours): blocks to the nearest fraction above it, then
    # channels trimmed through the budget service and fine-tuned with KD from the ensemble (``trim``)
    width: bool = True
    trim: TrainConfig = field(default_factory=default_trim)
    # With a target, FISTA decides (ours, issue 30): lam grows x10 every tenth of the cycle until the blocks
    # whose masks it zeroed meet the target; they are the blocks removed. False (or no decision by
    # commit_at): BlockCommit fixes the least-mask set instead (reported per replica in ``decided_by``)
    continuation: bool = True
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
            raise ValueError("OED.select_val must be >= 1: the best replica is chosen on validation images")
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

    def forward_all(self, x: Tensor, views: list[Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
        """Every replica's logits (replica k on ``views[k]`` when given) and the teacher's (over the
        ensembled penultimate features)."""
        logits = [r(x if views is None else views[k]) for k, r in enumerate(self.replicas)]
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


def _bagged_ce(z: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """CE weighted by one Poisson(1) draw per image (online bagging)."""
    w = torch.poisson(torch.ones(y.shape[0], device=z.device))
    ce = F.cross_entropy(z, y, label_smoothing=smoothing, reduction="none")
    return (w * ce).sum() / w.sum().clamp_min(1.0)


@dataclass(eq=False)
class OEDTask:
    """OED's loss: sum_k CE(y, z_k) + CE(y, z_T) + alpha * sum_k T^2 KL(z_T || z_k) (the teacher
    learns from the labels only: its logits are detached in the KD terms). With ``views`` replica k > 0
    sees its own random view of the batch, with ``bagging`` its CE weights each image by its own
    Poisson(1) draw: the peers differ, so the teacher ensembles more than copies (ours)."""

    temperature: float = 3.0
    alpha: float = 1.0
    label_smoothing: float = 0.0
    # the training set's own augmentation, drawn again for each replica k > 0 (its own view of the
    # batch; from the global RNG, which the loop checkpoints, so a resumed run draws the same views)
    views: Augment | None = None
    bagging: bool = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(teacher logits, {"ce": replicas' CE, "ce_teacher", "kd"})."""
        net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        k, aug = len(net.replicas), self.views
        views = ([x] + [apply_augment(x, aug) for _ in range(k - 1)]
                 if aug is not None and aug.enabled and model.training else None)
        logits, teacher = net.forward_all(x, views)
        ce = sum(_bagged_ce(z, y, self.label_smoothing) if i and self.bagging and model.training
                 else F.cross_entropy(z, y, label_smoothing=self.label_smoothing) for i, z in enumerate(logits))
        kd = sum(kd_loss(z, teacher, self.temperature) for z in logits)
        return teacher, {"ce": ce, "ce_teacher": F.cross_entropy(teacher, y, label_smoothing=self.label_smoothing),
                         "kd": self.alpha * kd}

    def modules(self) -> list[nn.Module]:
        """No networks besides the trained bundle."""
        return []

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The teacher as the main score, and each masked replica (``val_replica{k}_top1``)."""
        return {"": model, **{f"replica{k}": r for k, r in enumerate(model.replicas)}}


def finish(net: OEDNet, recipe: OED, x: Tensor, held: Any, eval_cfg: TrainConfig,
           blocks_target: Target | None = None, decided: list | None = None) -> tuple[nn.Module, dict]:
    """Keep the best replica on the validation images, fold its surviving masks, remove its
    zero-mask (and, for a target, lowest-mask) blocks physically. ``blocks_target``: what the blocks
    meet (the recipe's target, or its depth goal when channels do the rest); ``decided``: per
    replica, the blocks FISTA zeroed to meet it (None where BlockCommit chose), removed as they are."""
    net.cpu()
    accs = [evaluate(r, held, batch_size=eval_cfg.eval_batch_size, device="cpu")["top1"] for r in net.replicas]
    k = max(range(len(accs)), key=lambda i: (accs[i], -i))
    values = net.masks[k].detach().clone()
    net.detach_hooks()
    model = net.replicas[k]
    target = blocks_target or recipe.target()
    if decided is not None and decided[k] is not None and (target is None or target.latency is None):
        removed, check = frozenset(decided[k]), None
    else:
        removed, check = choose_blocks(model, x, net.sites, values, target)
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


def _validation(val: Any, n: int, seed: int) -> Any:
    """At most ``n`` images of the run's validation set (stratified where it can be): what picks the
    replica and judges block sets. Never carved from the training set (issue 30)."""
    if val is None:
        raise ValueError("OED keeps the replica with the best top-1 on the run's validation set: give one "
                         "(kp.load_splits / --val-split), not the test set")
    if len(val) <= n:
        return val
    if hasattr(val, "split"):  # an ImageDataset: stratified
        return val.split(n, seed=seed)[1]
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))  # any torch Dataset
    return Subset(val, order[:n].sort().values.tolist())


@dataclass(frozen=True)
class _BlocksPlan:
    """What the blocks meet (None: lam alone decides), each block's cost, the commit goal, and
    whether channels are trimmed afterwards to meet the recipe's target (depth + width)."""

    target: Target | None = None
    costs: dict[str, float] = field(default_factory=dict)
    goal: float = 1.0
    width: bool = False


def _blocks_plan(recipe: OED, model: nn.Module, x: Tensor, sites: dict[str, str]) -> _BlocksPlan:
    """A FLOPs/params target whole blocks miss gets a depth goal above it when ``recipe.width``."""
    target = recipe.target()
    if target is None:
        return _BlocksPlan()
    costs, goal = block_costs(model, x, sites, target), commit_goal(model, x, sites, target)
    if not recipe.width or target.latency is not None:  # a latency depth goal would need a measured split
        check_block_target(costs, goal, target.tolerance, target.metric)
        return _BlocksPlan(target, costs, goal)
    depth = depth_goal(costs, goal, target.tolerance)
    if depth == goal:
        return _BlocksPlan(target, costs, goal)
    return _BlocksPlan(Target(**{target.metric: depth}), costs, depth, width=True)


def _ensemble_snapshot(net: OEDNet, model: nn.Module, recipe: OED) -> OEDNet:
    """A frozen copy of the trained replicas + teacher head (its forward: the ensemble's logits),
    taken before ``finish`` turns the kept replica into the pruned model."""
    teacher = OEDNet(model, net.sites, recipe.replicas, recipe.gated)
    teacher.load_state_dict(net.state_dict())
    return teacher.cpu().eval()


def _trim(pruned: nn.Module, teacher: OEDNet, recipe: OED, ctx: CompressContext, info: dict) -> list[dict]:
    """Channels cut until the recipe's target holds (the budget service on the block-pruned model),
    then ``trim`` epochs of KD from the ensemble; ``info`` gets how much came from depth and width."""
    target = recipe.target()
    after_blocks = info[f"{target.metric}_kept"]
    rel = Target(**{target.metric: target.value / after_blocks})

    def cut() -> dict[str, Any]:
        rep = prune_to_target(pruned, ctx.example_input.cpu(), rel)
        return {"achieved": rep.achieved * after_blocks, "channels_removed": rep.plan.num_removed,
                "relative_target": rel.value}

    width = ctx.removal_step("trim-cut", pruned, cut)
    info["recalibration_trim"] = ctx.recalibrate(pruned, recipe)
    info["depth_width"] = {"metric": target.metric, "kept_by_blocks": after_blocks,
                           "kept_by_channels": width["achieved"] / after_blocks, "kept": width["achieved"],
                           "channels_removed": width["channels_removed"]}
    task = KDTask(teacher, temperature=recipe.temperature, alpha=0.9, label_smoothing=recipe.trim.label_smoothing)
    res = train(pruned, ctx.train, ctx.val, ctx.with_progress(recipe.trim, "oed trim"), task=task,
                out_dir=ctx.stage_dir("trim"), resume=ctx.resumable("trim"), save_model=False)
    return res.history


def _callbacks(recipe: OED, net: OEDNet, fista: FistaL1, plan: _BlocksPlan, x: Tensor, ctx: CompressContext,
               held: Any) -> list[Callback]:
    """FISTA, then (for a target) the block commit, so that its ramp caps what FISTA produced."""
    if plan.target is None:
        return [fista]
    sel = recipe.select
    judge = adaptive_bn_judge(net, x, ctx.train, held, sel) if isinstance(sel, AdaptiveBN) else None
    judging = {"judge": judge, "judged": 1 + sel.candidates if judge is not None else 1}
    tol = plan.target.tolerance
    if recipe.continuation:
        low = (recipe.target().value if plan.width else plan.goal) - tol  # width trims what blocks leave above
        return [fista, FistaDecides(fista, net.masks, plan.costs, plan.goal, low, recipe.commit_at, recipe.ramp,
                                    tol, **judging)]
    return [fista, BlockCommit(fista, net.masks, plan.costs, plan.goal, recipe.commit_at, recipe.ramp, tol,
                               **judging)]


@run_recipe.register
def _(recipe: OED, model: nn.Module, ctx: CompressContext) -> tuple[nn.Module, dict]:
    x = ctx.example_input
    sites = mask_sites(model, x)
    held = _validation(ctx.val, recipe.select_val, recipe.finetune.seed)
    plan = _blocks_plan(recipe, model, x, sites)
    net = OEDNet(model, sites, recipe.replicas, recipe.gated, recipe.perturb, recipe.finetune.seed)
    scale = recipe.mask_lr / recipe.finetune.optimizer.lr if recipe.mask_lr is not None else 1.0
    fista = FistaL1([net.masks], recipe.lam, scale, recipe.restart_on_decay)
    aug = getattr(ctx.train, "augment", None) if recipe.views else None  # a label-safe view needs the set's own
    task = OEDTask(recipe.temperature, recipe.alpha, recipe.finetune.label_smoothing,
                   aug if isinstance(aug, Augment) and aug.enabled else None, recipe.bagging)
    callbacks = _callbacks(recipe, net, fista, plan, x, ctx, held)
    res = train(net, ctx.train, held, ctx.with_progress(recipe.finetune, "oed"), task=task,
                out_dir=ctx.stage_dir("oed"), resume=ctx.resumable("oed"), callbacks=callbacks,
                record={"method": "oed"}, save_model=False)
    teacher = _ensemble_snapshot(net, model, recipe) if plan.width else None
    fista_sets = ([c if not f else None for c, f in zip(callbacks[1].chosen, callbacks[1].fallback)]
                  if isinstance(callbacks[-1], FistaDecides) else None)
    pruned, info = finish(net, recipe, x.cpu(), held, recipe.finetune, plan.target, fista_sets)
    info["recalibration"] = ctx.recalibrate(pruned, recipe)  # masks folded, blocks gone: every BN
    info.update(held_out=len(held), fista_restarts=fista.restarts, train=res.history,
                replica_views=repr(task.views) if task.views is not None else "off", bagging=task.bagging)
    if len(callbacks) > 1:
        info.update(committed_blocks=callbacks[1].chosen, committed_at_step=callbacks[1].at,
                    decided_by=["fista" if c is not None else "commit" for c in fista_sets]
                    if fista_sets is not None else ["commit"] * recipe.replicas)
        if callbacks[1].judge is not None:
            info["adaptive_bn"] = callbacks[1].scores
    target = recipe.target()
    if teacher is not None and abs(info[f"{target.metric}_kept"] - target.value) > target.tolerance:
        info["trim"] = _trim(pruned, teacher, recipe, ctx, info)
    return pruned, info
