"""OED: the online ensemble at init equals the pretrained model, the loss terms are what the
notes say (teacher learns from labels only), zero masks become removed blocks, a target lands
within 1% (by blocks, or by blocks then channels between block counts), the best replica is picked
on the run's validation images (none carved from the training set), the replicas see their own
views, kill + resume equals an uninterrupted run, and an OED result is a valid input to SDAP and KESI."""
import json

import pytest
import torch
import torch.nn.functional as F

import kdprune as kp
from kdprune.cli.recipe_flags import methods
from kdprune.data.transforms import Augment
from kdprune.distill import kd_loss
from kdprune.engine import mask_sites
from kdprune.methods.oed import OED, OEDNet, OEDTask, finish
from kdprune.models import create_model
from kdprune.training.config_io import from_dict, to_tagged_dict

from ..conftest import TinyNet, assert_resume_is_bit_exact

X = torch.zeros(1, 1, 8, 8)
CYCLE = kp.TrainConfig(epochs=2, batch_size=32, optimizer=kp.SGD(lr=0.05), progress=False, seed=3)


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_chans=1).eval()


def test_recipe_registration_validation_and_json():
    assert kp.recipes.OED is OED and methods()["oed"] is OED
    r = OED(replicas=2, lam=0.1, target_params=0.5, gated=True, finetune=CYCLE)
    assert from_dict(OED, json.loads(json.dumps(to_tagged_dict(r)))) == r
    assert OED().target() is None
    for bad in ({"replicas": 0}, {"lam": -1.0}, {"temperature": 0.0}, {"mask_lr": 0.0}, {"target_flops": 1.5},
                {"perturb": -0.1}, {"select_val": 0}):
        with pytest.raises(ValueError):
            OED(**bad)


def test_ensemble_at_init_is_the_pretrained_model():
    model = _resnet()
    x = torch.randn(4, 1, 8, 8)
    net = OEDNet(model, mask_sites(model, X), replicas=3, gated=False).eval()
    with torch.no_grad():
        logits, teacher = net.forward_all(x)
        ref = model(x)
    assert all(torch.equal(z, ref) for z in logits)  # masks at 1, unperturbed copies
    torch.testing.assert_close(teacher, ref, rtol=1e-5, atol=1e-6)  # head = fc over the mean features


def test_task_terms_and_the_teacher_learns_from_labels_only():
    model = _resnet()
    net = OEDNet(model, mask_sites(model, X), replicas=2, gated=True, perturb=0.05, seed=1).train()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    task = OEDTask(temperature=3.0, alpha=0.5)
    teacher, terms = task(net, x, y)
    torch.manual_seed(0)
    with torch.no_grad():
        net.eval()
        logits, t = net.forward_all(x)
        net.train()
    assert set(terms) == {"ce", "ce_teacher", "kd"}
    terms["kd"].backward()
    assert net.head.weight.grad is None or not net.head.weight.grad.any()  # KD never trains the teacher
    assert net.masks.grad is not None and net.masks.grad.abs().sum() > 0
    net.zero_grad()
    _, terms = task(net, x, y)
    logits, teacher = net.forward_all(x)
    assert terms["ce"].item() == pytest.approx(sum(F.cross_entropy(z, y) for z in logits).item(), rel=1e-5)
    want_kd = 0.5 * sum(kd_loss(z, teacher, 3.0) for z in logits)
    assert terms["kd"].item() == pytest.approx(want_kd.item(), rel=1e-5)


def test_finish_keeps_the_best_held_out_replica_and_removes_its_zero_mask_blocks(toy_data):
    train, _ = toy_data
    model = _resnet()
    net = OEDNet(model, mask_sites(model, X), replicas=2, gated=False, perturb=0.05, seed=2)
    with torch.no_grad():
        net.masks.copy_(torch.tensor([[0.0, 0.7, 1.0, 0.0, 0.4, 1.0, 0.9, 0.0, 0.6],
                                      [1.0, 0.0, 0.5, 0.8, 0.0, 1.0, 1.0, 0.3, 0.0]]))
    held = train.subset(40)
    accs = [kp.evaluate(r, held)["top1"] for r in net.replicas]
    best = max(range(2), key=lambda k: (accs[k], -k))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        masked = net.eval().replicas[best](x)
    pruned, info = finish(net, OED(finetune=CYCLE), X, held, CYCLE)
    zero = [b for b, v in zip(net.sites, net.masks[best].tolist()) if v == 0.0]
    assert info["selected_replica"] == best and info["replica_val_top1"] == accs
    assert info["removed_blocks"] == zero and len(zero) == 3
    assert [e["module"] for e in pruned.kdprune_structure if e["op"] == "remove_block"] == zero
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked, rtol=1e-5, atol=1e-5)  # folded + removed


def test_lam_drives_masks_to_zero_and_the_replica_is_picked_on_validation_images(toy_data, monkeypatch):
    from kdprune.training import loop

    train, val = toy_data
    seen = []
    real = loop.train

    def spy(model, train_set, *a, **k):
        seen.append(len(train_set))
        return real(model, train_set, *a, **k)

    monkeypatch.setattr(kp.methods.oed, "train", spy)
    res = kp.compress(_resnet(), OED(replicas=2, lam=6.0, finetune=CYCLE, select_val=20), train, val, latency=False)
    info = res.report["method"]
    assert info["held_out"] == 20 and len(info["replica_val_top1"]) == 2  # 20 of the 32 validation images
    assert seen == [len(train)]  # every training image trains: none carved out (issue 30)
    with pytest.raises(ValueError, match="validation set"):
        kp.compress(_resnet(), OED(replicas=2, finetune=CYCLE), train, None, latency=False)
    zero = [b for b, v in zip(mask_sites(_resnet(), X), info["masks"][info["selected_replica"]]) if v == 0.0]
    assert zero and info["removed_blocks"] == zero  # lam alone: exactly the zero-mask blocks
    assert res.report["after"]["params"] < res.report["before"]["params"]


def test_target_is_met_within_one_percent(toy_data):
    train, val = toy_data
    res = kp.compress(_resnet(), OED(replicas=2, lam=0.0, target_params=0.6, finetune=CYCLE, select_val=20),
                      train, val, latency=False)
    assert abs(res.report["method"]["params_kept"] - 0.6) <= 0.01
    assert res.report["method"]["removed_blocks"]
    assert res.report["method"]["recalibration"]["recalibrated"] >= 1 and "recalibrated" in res.report


def test_a_model_without_residual_blocks_gets_a_clear_error(toy_data):
    train, val = toy_data
    with pytest.raises(ValueError, match="no submodule adds a shortcut"):
        kp.compress(TinyNet(), OED(finetune=CYCLE), train, val, latency=False)


def test_resume_after_kill_is_bit_exact(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    recipe = OED(replicas=2, lam=1.0, finetune=CYCLE, select_val=20)

    def run(out, resume):
        return kp.compress(_resnet(), recipe, train, val, out_dir=out, resume=resume, latency=False).model

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch)


def test_an_oed_result_feeds_sdap_and_kesi(toy_data):
    train, val = toy_data
    oed = kp.compress(_resnet(), OED(replicas=2, lam=0.0, target_params=0.7, finetune=CYCLE, select_val=20), train,
                      val, latency=False)
    assert oed.report["method"]["removed_blocks"]
    ft = kp.TrainConfig(epochs=1, batch_size=32, optimizer=kp.SGD(lr=0.02), progress=False)
    sdap = kp.compress(oed.model, kp.recipes.SDAP(target_flops=0.5, finetune=ft, ramp_epochs=0.5), train, val,
                       latency=False)
    assert abs(sdap.report["method"]["flops_kept"] - 0.5) <= 0.01
    kesi = kp.compress(oed.model, kp.recipes.KESI(target_flops=0.6, rounds=2, finetune=ft, distill=ft), train, val,
                       latency=False)
    assert kesi.report["after"]["flops"] < oed.report["after"]["flops"]


def _commit_state(step: int) -> "kp.training.LoopState":
    from kdprune.training import LoopState
    return LoopState(model=torch.nn.Identity(), optimizer=None, epoch=0, step=step, steps_per_epoch=10, epochs=2,
                     lr=0.1)


def test_block_commit_fixes_the_least_mask_blocks_ramps_them_to_zero_and_stops_the_rest():
    from kdprune.methods.oed import BlockCommit
    from kdprune.training.prox import FistaL1
    masks = torch.nn.Parameter(torch.tensor([[0.9, 0.2, 0.8, 0.3], [0.5, 0.5, 0.1, 0.9]]))
    costs = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    fista = FistaL1([masks], lam=0.5)
    cb = BlockCommit(fista, masks, costs, goal=0.5, commit_at=0.25, ramp=0.2)  # commit at step 5, 4-step ramp
    cb.on_optimizer_step(_commit_state(4))
    assert cb.chosen == [None, None]
    cb.on_optimizer_step(_commit_state(5))
    assert cb.chosen == [["b", "d"], ["a", "c"]]  # per replica, the least total mask that keeps 50%
    assert torch.equal(fista.lams[0], torch.zeros(2, 4))  # no more shrinking of the kept blocks
    for step, frac in ((6, 0.75), (7, 0.5), (9, 0.0), (12, 0.0)):
        masks.data[0, 1] = 1.0  # whatever FISTA proposes, the ramp caps it
        cb.on_optimizer_step(_commit_state(step))
        assert masks[0, 1].item() == pytest.approx(0.2 * frac) and masks[0, 0].item() == pytest.approx(0.9)
    assert masks[1, 2].item() == 0.0 and masks[1, 0].item() == 0.0
    fresh = BlockCommit(FistaL1([masks], 0.5), masks, costs, 0.5, 0.25, 0.2)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.chosen == cb.chosen and fresh.at == cb.at and torch.equal(fresh.start[0], cb.start[0])


def test_block_commit_commits_early_once_the_zero_masks_reach_the_target():
    from kdprune.methods.oed import BlockCommit
    from kdprune.training.prox import FistaL1
    masks = torch.nn.Parameter(torch.tensor([[0.0, 0.7, 0.0, 0.3]]))
    cb = BlockCommit(FistaL1([masks], 0.5), masks, {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, 0.5, 0.9, 0.05)
    cb.on_optimizer_step(_commit_state(1))
    assert cb.chosen == [["a", "c"]] and cb.at == [1]


def test_a_target_commits_blocks_during_the_cycle_and_removes_exactly_them(toy_data):
    train, val = toy_data
    recipe = OED(replicas=2, lam=0.5, target_params=0.7, commit_at=0.25, ramp=0.25, finetune=CYCLE, select_val=20)
    res = kp.compress(_resnet(), recipe, train, val, latency=False)
    info = res.report["method"]
    assert abs(info["params_kept"] - 0.7) <= 0.01
    assert info["removed_blocks"] == info["committed_blocks"][info["selected_replica"]]
    assert info["zero_mask_blocks"] == len(info["removed_blocks"])  # zero during the cycle: nothing cut live


def test_blocks_only_refuses_a_target_between_block_counts_before_training(toy_data, monkeypatch):
    from kdprune.training import loop

    train, val = toy_data
    monkeypatch.setattr(loop, "_run_epochs", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=r"no set of whole blocks keeps 0.5 of the flops .* nearest reachable "
                                         r"fractions are 0\.\d+, 0\.\d+"):
        kp.compress(_resnet(), OED(replicas=2, target_flops=0.5, width=False, finetune=CYCLE, select_val=20), train,
                    val, latency=False)


@pytest.mark.parametrize("target", [{"target_flops": 0.5}, {"target_flops": 0.62}])
def test_a_target_between_block_counts_is_met_by_depth_then_width(toy_data, target, tmp_path):
    """Whole blocks of this ResNet-20 keep 0.473 or 0.532 of its FLOPs: blocks go to the nearest
    fraction above 0.5, channels (KD from the ensemble) do the rest, and the report splits the two."""
    train, val = toy_data
    trim = kp.TrainConfig(epochs=1, batch_size=32, progress=False)
    res = kp.compress(_resnet(), OED(replicas=2, lam=0.0, finetune=CYCLE, trim=trim, select_val=20, **target),
                      train, val, out_dir=tmp_path, latency=False)
    (metric, goal), = ((k.removeprefix("target_"), v) for k, v in target.items())
    kept = res.report["after"][metric] / res.report["before"][metric]
    split = res.report["method"]["depth_width"]
    assert abs(kept - goal) <= 0.01 and abs(split["kept"] - kept) < 1e-6
    assert res.report["method"]["removed_blocks"] and split["channels_removed"] > 0
    assert split["kept_by_blocks"] > goal and abs(split["kept_by_blocks"] * split["kept_by_channels"] - kept) < 1e-6
    assert res.report["method"]["trim"] and (tmp_path / "trim").is_dir()
    loaded = kp.load_pruned(tmp_path / "model", factory=_resnet)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), res.model.eval()(x))


class _Block(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _DeadAndLive(torch.nn.Module):
    """Two residual blocks of equal cost; ``dead``'s branch ends in a BatchNorm held at gamma = beta = 0
    (the block is the identity), so only ``live`` carries what the head learned."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c),
                                        torch.nn.ReLU())
        self.dead, self.live = _Block(c), _Block(c)
        self.fc = torch.nn.Linear(c, 4)
        with torch.no_grad():
            self.dead.bn2.weight.zero_()
            self.dead.bn2.bias.zero_()
        self.dead.bn2.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.live(self.dead(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_bn_commits_the_dead_block_where_the_least_mask_rule_cuts_the_live_one(seed):
    """Planted: the live block has the smaller mask, so the least-mask rule commits it; the adaptive-BN
    judge scores both one-block sets (re-estimated, held-out top-1) and commits the dead one."""
    from kdprune.methods.oed import BlockCommit, adaptive_bn_judge
    from kdprune.training.prox import FistaL1
    from ..conftest import make_images

    train, held = make_images(256, seed=0), make_images(64, seed=1)
    torch.manual_seed(seed)
    net = kp.train(_DeadAndLive(), train, None, kp.TrainConfig(epochs=4, batch_size=16, progress=False,
                                                               optimizer=kp.SGD(lr=0.05, weight_decay=0.0))).model
    assert kp.training.evaluate(net, held)["top1"] > 90
    ens = OEDNet(net, mask_sites(net, X), 1, gated=False)
    with torch.no_grad():
        ens.masks[0] = torch.tensor([0.9, 0.1])  # (dead, live)
    costs = {"dead": 0.5, "live": 0.5}
    picks = {}
    for name, judge in (("least-mask", None),
                        ("adaptive-bn", adaptive_bn_judge(ens, X, train, held, kp.engine.AdaptiveBN(images=64)))):
        masks = torch.nn.Parameter(ens.masks.detach().clone())
        cb = BlockCommit(FistaL1([masks], 0.1), masks, costs, 0.5, 0.0, 0.5, judge=judge, judged=2)
        cb.on_optimizer_step(_commit_state(0))
        picks[name] = (cb.chosen[0], cb.scores[0])
    assert picks["least-mask"] == (["live"], None)
    (chosen, scores) = picks["adaptive-bn"]
    assert chosen == ["dead"] and [s["blocks"] for s in scores] == [["live"], ["dead"]]
    assert scores[1]["top1"] >= scores[0]["top1"] + 20  # cutting the live block is what costs accuracy


def test_a_judged_commit_reaches_the_target_and_reports_its_scores(toy_data):
    train, val = toy_data
    sel = kp.engine.AdaptiveBN(candidates=2, images=16, batches=2)
    recipe = OED(replicas=2, lam=0.5, target_params=0.7, commit_at=0.25, ramp=0.25, finetune=CYCLE, select_val=20,
                 select=sel)
    info = kp.compress(_resnet(), recipe, train, val, latency=False).report["method"]
    assert abs(info["params_kept"] - 0.7) <= 0.01
    k = info["selected_replica"]
    assert info["removed_blocks"] == info["committed_blocks"][k]
    scores = info["adaptive_bn"][k]
    best = max(scores, key=lambda s: s["top1"])  # the first of equal scores: the least-mask set
    assert len(scores) == 3 and info["committed_blocks"][k] == best["blocks"]


def test_replicas_see_their_own_views_and_weights_in_the_same_step():
    """With views, replica 1's input differs from replica 0's (the batch itself) in the same step; the
    ensemble at evaluation still reads one batch; the twin without views feeds both the same tensor."""
    net = OEDNet(_resnet(), mask_sites(_resnet(), X), replicas=2, gated=False).train()
    seen: list = []
    hooks = [r.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())) for r in net.replicas]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    torch.manual_seed(0)
    OEDTask(views=Augment(pad=1, hflip=True), bagging=True)(net, x, y)
    assert torch.equal(seen[0], x) and not torch.equal(seen[1], x) and seen[1].shape == x.shape
    seen.clear()
    OEDTask(views=None, bagging=False)(net, x, y)
    assert torch.equal(seen[0], seen[1])
    seen.clear()
    net.eval()
    OEDTask(views=Augment(pad=1, hflip=True))(net, x, y)
    assert torch.equal(seen[0], seen[1])  # evaluation: every replica on the batch itself
    for h in hooks:
        h.remove()


def test_fista_decides_grows_lam_until_its_zeros_fit_revives_an_overshoot_and_holds_them():
    """The mechanism of issue 30's 'FISTA decides': lam grows while the zero masks keep too much; a
    step that zeroes too many revives its newest zeros (largest previous mask first); the set that
    fits is held at zero and the rest stop shrinking; no least-mask commit is involved."""
    from kdprune.methods.oed import FistaDecides
    from kdprune.training.prox import FistaL1
    masks = torch.nn.Parameter(torch.tensor([[0.9, 0.2, 0.8, 0.3]]))
    costs = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    fista = FistaL1([masks], lam=0.5)
    cb = FistaDecides(fista, masks, costs, goal=0.5, low=0.49, commit_at=0.9, ramp=0.05)
    cb.on_optimizer_step(_commit_state(1))  # nothing zero yet: lam grows (x10 per tenth of 20 steps)
    assert cb.chosen == [None] and float(fista.lams[0][0, 0]) == pytest.approx(0.5 * 10 ** 0.5)
    masks.data = torch.tensor([[0.9, 0.0, 0.0, 0.0]])  # one step zeroed b, c and d: keeps 25% < 49%
    cb.on_optimizer_step(_commit_state(2))
    assert cb.chosen == [["b", "d"]]  # c (0.8 before) revived, then b and d fit exactly
    assert masks[0, 2].item() == pytest.approx(0.8) and torch.equal(fista.lams[0], torch.zeros(1, 4))
    masks.data[0, 1] = 0.4  # whatever FISTA proposes, the decided blocks stay at zero
    cb.on_optimizer_step(_commit_state(3))
    assert masks[0, 1].item() == 0.0 and cb.fallback == [False]
    fresh = FistaDecides(FistaL1([masks], 0.5), masks, costs, 0.5, 0.49, 0.9, 0.05)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.chosen == cb.chosen and torch.equal(fresh.prev, cb.prev) and torch.equal(fresh.lam, cb.lam)


def test_fista_falls_back_to_the_least_mask_commit_at_the_deadline_and_says_so():
    from kdprune.methods.oed import FistaDecides
    from kdprune.training.prox import FistaL1
    masks = torch.nn.Parameter(torch.tensor([[0.9, 0.2, 0.8, 0.3]]))
    fista = FistaL1([masks], lam=0.0)
    cb = FistaDecides(fista, masks, {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, 0.5, 0.49, 0.25, 0.2)
    cb.on_optimizer_step(_commit_state(5))
    assert cb.chosen == [["b", "d"]] and cb.fallback == [True] and float(fista.lams[0].abs().sum()) == 0.0


def test_by_default_the_removed_blocks_are_the_ones_fista_zeroed(toy_data):
    train, val = toy_data
    cycle = kp.TrainConfig(epochs=4, batch_size=16, optimizer=kp.SGD(lr=0.05), progress=False, seed=3)
    recipe = OED(replicas=2, lam=0.05, target_params=0.7, commit_at=0.8, ramp=0.1, finetune=cycle, select_val=20)
    info = kp.compress(_resnet(), recipe, train, val, latency=False).report["method"]
    k = info["selected_replica"]
    assert info["decided_by"] == ["fista", "fista"]  # no commit heuristic
    zero = [b for b, v in zip(mask_sites(_resnet(), X), info["masks"][k]) if v == 0.0]
    assert info["removed_blocks"] == zero and abs(info["params_kept"] - 0.7) <= 0.01
