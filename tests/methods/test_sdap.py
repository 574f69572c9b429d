"""SDAP (Diao et al., Pattern Recognition 2024): gates, cubic ramp, weighted global ranking,
fold/removal equivalence, targets after removal, exact resume, no teacher at alpha=0."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import kdprune as kp
from kdprune.cli.compress_cmd import methods
from kdprune.training.config_io import from_dict, to_tagged_dict
from kdprune.distill import CETask, KDTask
from kdprune.engine import ChannelGroup, Global, Member, Uniform, apply_plan, channel_groups, fold_gates_into_bn
from kdprune.methods.base import CompressContext
from kdprune.methods.registry import run_recipe
from kdprune.methods.sdap import (
    SDAP, Gate, ScaledGate, channel_costs, cubic_rate, fold_and_remove, gated_windows, global_keep, keep_to_plan,
    prepare, sdap_stages, sdap_task,
)
from kdprune.training import LoopState

from ..conftest import TinyNet, assert_resume_is_bit_exact, make_images
from ..engine.tiny_models import MiniRes, randomize

torch.set_num_threads(1)

FT = kp.TrainConfig(epochs=2, batch_size=32, optimizer=kp.SGD(lr=0.02), progress=False, seed=2)
X = torch.zeros(1, 1, 8, 8)


def TinyNet32() -> TinyNet:
    """Factory for save/load of the test model."""
    return TinyNet(width=32)


def MiniResB() -> MiniRes:
    """Factory: residual net with coupled (shared-gate) channel groups."""
    return MiniRes("B", num_classes=4)


def _net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet32()


def _state(step: int = 0, steps_per_epoch: int = 4, epochs: int = 2) -> LoopState:
    return LoopState(None, None, 0, step, steps_per_epoch, epochs)


@pytest.mark.parametrize("make, x", [(TinyNet32, torch.randn(4, 1, 8, 8)), (MiniResB, torch.randn(4, 3, 16, 16))])
def test_gates_at_init_leave_outputs_unchanged(make, x):
    torch.manual_seed(0)
    m = randomize(make(), x)
    ref = m(x)
    masks, cb = prepare(m, SDAP(target_flops=0.5), x[:1])
    cb.on_train_start(_state())
    assert all(k.all() for k in cb.keep.values())  # p_0 = 0: nothing masked yet
    assert all(torch.equal(masks.value(r), torch.ones_like(masks.value(r))) for r in masks.groups)
    assert torch.equal(m(x), ref)
    if make is MiniResB:  # coupled channels (residual adds) share one gate: one group per add chain
        groups = {g.root: g for g in channel_groups(copy.deepcopy(m), x[:1])}
        assert set(masks.groups) == set(groups) and any(len(g.sites) > 1 for g in groups.values())


def test_ramp_follows_cubic_formula():
    assert cubic_rate(0, 100, 0.6) == 0.0
    assert cubic_rate(50, 100, 0.6) == pytest.approx(0.6 * (1 - 0.5 ** 3))
    assert cubic_rate(25, 100, 0.6) == pytest.approx(0.6 * (1 - 0.75 ** 3))
    assert cubic_rate(100, 100, 0.6) == cubic_rate(170, 100, 0.6) == cubic_rate(3, 0, 0.6) == 0.6
    masks, cb = prepare(_net(), SDAP(target_params=0.4, ramp_epochs=1.5, mode=Global()), X)
    assert cb.ramp_steps(_state()) == 6 and cb.ramp_steps(_state(epochs=1)) == 4  # clamped to the run
    cb.p_final = 0.4
    w = cb.ctl.weights
    total, wmax = sum(float(v.sum()) for v in w.values()), max(float(v.max()) for v in w.values())
    before = None
    for t in range(10):
        cb.remask(_state(step=t))
        share = sum(float(w[r][~k].sum()) for r, k in cb.keep.items()) / total
        p_t = 0.4 * (1 - (1 - min(t, 6) / 6) ** 3)
        assert cb.rate(_state(step=t)) == pytest.approx(p_t)
        assert p_t - wmax / total < share <= p_t + 1e-12  # weighted prefix up to p_t
        masked = {(r, i) for r, k in cb.keep.items() for i in (~k).nonzero().flatten().tolist()}
        assert before is None or before <= masked  # gates held at 0 stay masked as p_t grows
        assert all(float(masks.value(r).detach()[i]) == 0.0 for r, i in masked)
        before = masked


def _group(root: str, n: int) -> ChannelGroup:
    idx = tuple(range(n))
    return ChannelGroup(0, root, "out", n, (Member(root, "conv", "out", idx, idx),), (root,))


def test_global_ranking_honours_weights_and_min_width():
    groups = [_group("a", 4), _group("b", 4)]
    gates = {"a": torch.tensor([0.1, 0.5, 0.9, 0.95]), "b": torch.tensor([0.2, 0.3, 0.4, 0.6])}
    heavy = {"a": torch.ones(4), "b": torch.full((4,), 3.0)}  # total 16
    flat = {"a": torch.ones(4), "b": torch.ones(4)}  # total 8

    def masked(weights, rate, min_width=1):
        keep = global_keep(groups, gates, weights, rate, min_width)
        return {(r, i) for r, k in keep.items() for i in (~k).nonzero().flatten().tolist()}

    # |g| order: a0 b0 b1 b2 a1 b3 a2 a3; protected (min_width=1): a3, b3
    assert masked(heavy, 0.25) == {("a", 0), ("b", 0)}  # cum weight 1, 4 <= 4
    assert masked(heavy, 0.5) == {("a", 0), ("b", 0), ("b", 1)}  # 1, 4, 7 <= 8 < 10
    assert masked(flat, 0.5) == {("a", 0), ("b", 0), ("b", 1), ("b", 2)}  # 4 channels of 8
    assert masked(heavy, 1.0) == {("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)}
    assert masked(heavy, 1.0, min_width=3) == {("a", 0), ("b", 0)}  # each keeps its 3 largest |g|
    assert masked(heavy, 0.0) == set()


def test_channel_costs_are_params_and_flops_each_channel_carries():
    m = _net()
    groups = channel_groups(copy.deepcopy(m), X)
    params = channel_costs(m, groups, "params", X)
    # conv1 channel: its 3x3 filter + BN gamma/beta + its input slice of conv2 (32 x 3x3)
    assert torch.equal(params["features.0"], torch.full((32,), 9.0 + 2 + 32 * 9, dtype=torch.float64))
    # conv2 channel: 32x3x3 filter + BN gamma/beta + its column of fc (4 classes)
    assert torch.equal(params["features.3"], torch.full((32,), 32 * 9.0 + 2 + 4, dtype=torch.float64))
    flops = channel_costs(m, groups, "flops", X)
    assert float(flops["features.3"][0]) == pytest.approx(2 * 32 * 9 * 64 + 2 * 4)


def test_fold_equals_gated_and_masked_equals_pruned(toy_data):
    train, _ = toy_data
    m = _net()
    masks, cb = prepare(m, SDAP(target_flops=0.5, gate_l1=1e-3, ramp_epochs=1), X)
    kp.train(m, train, None, FT, callbacks=[cb])
    x = torch.randn(6, 1, 8, 8)
    m.eval()
    gated = m(x)
    gates = torch.cat([masks.value(r).detach() for r in masks.groups])
    keep = torch.cat(list(cb.keep.values()))
    assert (~keep).sum() > 0 and torch.all(gates[~keep] == 0) and not torch.all(gates[keep] == 1)
    folded = copy.deepcopy(m)
    fold_gates_into_bn(folded, folded.kdprune_masks)
    assert not hasattr(folded, "kdprune_masks")
    torch.testing.assert_close(folded(x), gated, atol=1e-6, rtol=1e-6)
    apply_plan(folded, X, keep_to_plan(cb.keep))
    torch.testing.assert_close(folded(x), gated, atol=1e-5, rtol=1e-5)
    plan = fold_and_remove(m, masks, cb.keep, X)
    assert plan.num_removed == int((~keep).sum())
    torch.testing.assert_close(m(x), gated, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in folded.parameters())


@pytest.mark.parametrize("recipe, factory", [
    (SDAP(target_flops=0.5, finetune=FT, mode=Global()), TinyNet32),
    (SDAP(target_params=0.4, finetune=FT, gate_l1=1e-3), TinyNet32),
    (SDAP(target_flops=0.5, finetune=FT, mode=Uniform(), remove_each_epoch=False), TinyNet32),
    (SDAP(target_params=0.5, finetune=FT, ramp_epochs=1), MiniResB),
    (SDAP(target_flops=0.5, finetune=FT, ramp_epochs=2, mode=Global()), MiniResB),
])
def test_target_met_after_removal_and_saved(recipe, factory, tmp_path):
    chans = 3 if factory is MiniResB else 1
    train = make_images(128, chans=chans, size=16 if chans == 3 else 8, seed=0)
    torch.manual_seed(0)
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = kp.compress(model, recipe, train, None, out_dir=tmp_path, latency=False, progress=False,
                      factory=factory)
    key = recipe.target().metric
    kept = res.report["after"][key] / res.report["before"][key]
    assert abs(kept - recipe.target().value) <= 0.01
    assert res.report["method"]["achieved"] == pytest.approx(kept)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(res.model, "kdprune_masks")
    assert not any("kdprune_masks" in n for n in res.model.state_dict())
    assert all(not mod._forward_hooks for mod in res.model.modules())
    x = torch.randn(3, *train.images.shape[1:])
    loaded = kp.load_pruned(tmp_path / "model", factory=factory)
    assert torch.equal(loaded(x), res.model(x))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["recipe"]["type"] == "SDAP" and saved["method"]["channels_removed"] > 0
    cuts = saved["method"]["cut_each_epoch"]  # channels cut after each gated epoch but the last
    assert (len(cuts) == 1 and cuts[0] > 0) == (recipe.remove_each_epoch and sdap_stages(recipe)[0].epochs == 2)


def test_resume_after_kill_is_bit_exact(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    recipe = SDAP(target_flops=0.5, finetune=FT, ramp_epochs=1.5, gate_l1=1e-3)

    def run(out, resume):
        return kp.compress(_net(), recipe, train, val, out_dir=out, resume=resume, latency=False,
                           factory=TinyNet32).model

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch)


FT3 = kp.TrainConfig(epochs=3, batch_size=32, optimizer=kp.SGD(lr=0.02), progress=False, seed=2)


def test_stages_split_the_run_after_the_ramp():
    gated, pruned = sdap_stages(SDAP(target_flops=0.5, finetune=FT3, ramp_epochs=1.5))
    assert (gated.epochs, gated.start_epoch, gated.total_epochs()) == (2, 0, 3)
    assert (pruned.epochs, pruned.start_epoch, pruned.total_epochs()) == (1, 2, 3)
    assert sdap_stages(SDAP(target_flops=0.5, finetune=FT3, ramp_epochs=3)) == (FT3, None)
    assert sdap_stages(SDAP(target_flops=0.5, finetune=FT3, remove_early=False)) == (FT3, None)
    assert sdap_stages(SDAP(target_flops=0.5, finetune=FT3, ramp_epochs=0))[0].epochs == 1


def test_early_removal_trains_the_pruned_net_on_the_same_schedule(toy_data, tmp_path):
    """After the ramp the rest of the run trains the physically pruned network: same epochs,
    same LR at every epoch end as the gated-throughout run, and the target still met."""
    train, val = toy_data
    runs = {}
    for early in (True, False):
        recipe = SDAP(target_flops=0.5, finetune=FT3, ramp_epochs=1, remove_early=early)
        res = kp.compress(_net(), recipe, train, val, out_dir=tmp_path / str(early), latency=False,
                          progress=False, factory=TinyNet32)
        runs[early] = res
    early, late = runs[True], runs[False]
    assert [r["lr"] for r in early.report["method"]["train"]] == [r["lr"] for r in late.report["method"]["train"]]
    assert early.report["method"]["removed_after_epochs"] == 1
    assert late.report["method"]["removed_after_epochs"] is None
    assert (tmp_path / "True" / "sdap-pruned" / "checkpoint.pt").is_file()
    assert abs(early.report["after"]["flops"] / early.report["before"]["flops"] - 0.5) <= 0.01


def test_resume_inside_the_pruned_stage_is_bit_exact(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    recipe = SDAP(target_flops=0.5, finetune=FT3, ramp_epochs=1, gate_l1=1e-3)

    def run(out, resume):
        return kp.compress(_net(), recipe, train, val, out_dir=out, resume=resume, latency=False,
                           progress=False, factory=TinyNet32).model

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch, kill_after=2)  # epoch 1 of the pruned stage


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("teacher called")


def test_alpha_zero_uses_no_teacher(toy_data):
    train, _ = toy_data
    ctx = CompressContext(_Boom(), train, None, X, None, False, False)
    assert isinstance(sdap_task(SDAP(target_flops=0.5, alpha=0.0), ctx), CETask)
    task = sdap_task(SDAP(target_flops=0.5, alpha=0.9, temperature=2.0), ctx)
    assert isinstance(task, KDTask) and task.alpha == 0.9 and task.temperature == 2.0
    model, info = run_recipe(SDAP(target_flops=0.5, alpha=0.0, finetune=FT), _net(), ctx)
    assert abs(info["flops_kept"] - 0.5) <= 0.01
    with pytest.raises(RuntimeError, match="teacher called"):
        run_recipe(SDAP(target_flops=0.5, alpha=0.9, finetune=FT), _net(), ctx)


def test_recipe_registration_validation_and_json():
    assert kp.recipes.SDAP is SDAP and methods()["sdap"] is SDAP
    assert SDAP(target_params=0.25).remove_each_epoch  # chosen on issue 16's grid (docs/methods/sdap.md)
    # chosen on the validation split (benchmarks/sdap_global.yaml, docs/methods/sdap.md)
    assert SDAP(target_params=0.25).mode == Global() and SDAP(target_params=0.25).saliency == ScaledGate()
    r = SDAP(target_params=0.3, ramp_epochs=2.5, mode=Uniform(), weight_by_cost=False)
    assert from_dict(SDAP, json.loads(json.dumps(to_tagged_dict(r)))) == r
    for bad in ({"mode": "layer"}, {"alpha": 1.5}, {"round_to": 8}, {"ramp_epochs": -1}, {"min_width": 0}):
        with pytest.raises(ValueError):
            SDAP(target_flops=0.5, **bad)
    with pytest.raises(ValueError, match="cannot be met"):
        prepare(_net(), SDAP(target_params=0.1, min_width=16), X)


def test_gated_windows_split_the_gated_stage_into_epochs():
    gated, _ = sdap_stages(SDAP(target_flops=0.5, finetune=FT3, ramp_epochs=1.5))
    assert gated_windows(gated, each_epoch=False) == [gated]
    wins = gated_windows(gated, each_epoch=True)
    assert [(w.epochs, w.start_epoch, w.total_epochs()) for w in wins] == [(1, 0, 3), (1, 1, 3)]


# momentum and weight decay: the state each cut window's fresh optimizer gets is the old one's, cut
MOMENTUM = kp.TrainConfig(epochs=3, batch_size=32, optimizer=kp.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4),
                          progress=False, seed=2)


def _res_run(tmp_path, each: bool):
    train = make_images(96, chans=3, size=16, seed=0)
    torch.manual_seed(0)
    recipe = SDAP(target_params=0.5, finetune=MOMENTUM, ramp_epochs=2, remove_each_epoch=each)
    return kp.compress(MiniResB(), recipe, train, None, out_dir=tmp_path / str(each), latency=False,
                       progress=False, factory=MiniResB)


def test_cutting_each_epoch_trains_what_the_gated_run_trains(tmp_path):
    """Cutting zero-gated channels between epochs changes the cost, not the training: with the
    optimizer's momentum following the surviving channels, the result equals the run gated for
    the whole ramp."""
    cut, gated = _res_run(tmp_path, True), _res_run(tmp_path, False)
    assert cut.report["method"]["cut_each_epoch"][0] > 0 and gated.report["method"]["cut_each_epoch"] == []
    assert (tmp_path / "True" / "sdap-2" / "checkpoint.pt").is_file()
    a, b = cut.model.state_dict(), gated.model.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    loss = [(h["train_loss"], g["train_loss"]) for h, g in zip(cut.report["method"]["train"],
                                                                 gated.report["method"]["train"], strict=True)]
    assert all(abs(h - g) < 1e-4 for h, g in loss)


def test_resume_between_cuts_is_bit_exact(tmp_path, monkeypatch):
    train = make_images(96, chans=3, size=16, seed=0)
    recipe = SDAP(target_params=0.5, finetune=FT3, ramp_epochs=2, remove_each_epoch=True)

    def run(out, resume):
        torch.manual_seed(0)
        return kp.compress(MiniResB(), recipe, train, None, out_dir=out, resume=resume, latency=False,
                           progress=False, factory=MiniResB).model

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch, kill_after=2)  # after the cut, in window 2


def test_masks_move_grouped_conv_channels_as_whole_classes():
    """A grouped conv removes the same position from every conv group: SDAP's per-channel ranking
    masks whole tie classes (was: a split class, and prune_channels refused the cut)."""
    from kdprune.engine import ChannelGroup
    from kdprune.methods.sdap_rank import close_ties

    g = ChannelGroup(0, "conv", "out", 4, (), (), ties=((0, 2), (1, 3)))
    keep = {"conv": torch.tensor([False, True, True, False])}
    assert close_ties([g], keep)["conv"].tolist() == [True, True, True, True]  # both classes split: kept
    keep = {"conv": torch.tensor([False, True, False, True])}
    assert close_ties([g], keep)["conv"].tolist() == [False, True, False, True]  # a whole class: masked


def test_the_scaled_global_rate_cuts_the_planted_dead_channels(planted, toy_data):
    """Planted: conv1 has 28 dead channels (BN gamma = beta = 0) of 32. Their gates get no gradient and
    stay at 1, so |g| cannot see them; |g| * |gamma| ranks them last, and one global rate then cuts the
    over-wide conv1 only, where a uniform rate cuts conv2's live channels as deep."""
    train, val = toy_data

    def run(mode, saliency):
        torch.manual_seed(0)
        recipe = SDAP(target_flops=0.4, mode=mode, saliency=saliency, ramp_epochs=1,
                      finetune=kp.TrainConfig(epochs=2, batch_size=16, progress=False))
        return kp.compress(copy.deepcopy(planted), recipe, train, val, latency=False)

    def live(res) -> int:  # conv1's surviving live channels (dead ones have zero filters)
        return int((res.model.conv1.weight.flatten(1).abs().sum(1) > 0).sum())

    scaled, uniform, paper = run(Global(), ScaledGate()), run(Uniform(), Gate()), run(Global(), Gate())
    ws, wu = scaled.report["widths"]["after"], uniform.report["widths"]["after"]
    assert ws["conv2"] == 32 > wu["conv2"] and ws["conv1"] < wu["conv1"]
    assert live(scaled) == 4  # every live conv1 channel survived: only dead ones were cut
    assert live(paper) < 4  # the paper's |g|: the dead channels' gates sat at 1 and outranked live ones
    assert scaled.report["after"]["top1"] > paper.report["after"]["top1"]
    for res in (scaled, uniform, paper):
        assert abs(res.report["after"]["flops"] / res.report["before"]["flops"] - 0.4) <= 0.01


def test_site_scale_is_the_gated_batchnorms_gamma(planted):
    from kdprune.engine import attach_masks
    groups = channel_groups(copy.deepcopy(planted), torch.zeros(1, 1, 8, 8))
    masks = attach_masks(planted, groups, kind=kp.engine.MaskKind.GATE)
    scale = masks.site_scale()
    assert torch.allclose(scale["conv1"].float(), planted.bn1.weight.detach().abs())
    assert (scale["conv1"][4:] == 0).all() and (scale["conv1"][:4] > 0).all()
