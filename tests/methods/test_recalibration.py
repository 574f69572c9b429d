"""BatchNorm re-estimation in every method's removal step: on by default, reported as the
"pruned + BN recal." row, off with recal_batches=0, exact after a kill during it; the adaptive-BN
allocation keeps the candidate its recalibrated score ranks first."""
from __future__ import annotations

import copy

import pytest
import torch

import kdprune as kp
from kdprune.engine import recalibrate

from ..conftest import TinyNet

FT = kp.TrainConfig(epochs=1, batch_size=32, optimizer=kp.SGD(lr=0.02), progress=False, seed=2)

def _net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(width=32)

def _trained(toy_data) -> TinyNet:
    train, val = toy_data
    return kp.train(_net(), train, val, kp.TrainConfig(epochs=3, batch_size=16, optimizer=kp.SGD(lr=0.05),
                                                       progress=False)).model

ONE = dict(finetune=FT)
METHODS = [
    kp.recipes.L1Finetune(target_flops=0.5, **ONE),
    kp.recipes.KDFinetune(target_flops=0.5, **ONE),
    kp.recipes.GroupNorm(target_flops=0.5, sparse=FT, **ONE),
    kp.recipes.SDAP(target_flops=0.5, ramp_epochs=1, finetune=kp.TrainConfig(epochs=2, batch_size=32, progress=False)),
    kp.recipes.KESI(target_flops=0.5, rounds=2, retrain_epochs=1, distill_epochs=1, **ONE),
    kp.recipes.EDP(target_flops=0.6, sparse=FT, **ONE),
    kp.recipes.TPMagnitude(target_params=0.25, mode=kp.engine.Global(), **ONE),
]

@pytest.mark.parametrize("recipe", METHODS, ids=lambda r: type(r).__name__)
def test_every_removal_step_re_estimates_and_reports(recipe, toy_data):
    train, val = toy_data
    res = kp.compress(_trained(toy_data), recipe, train, val, latency=False)
    rep = res.report
    info = rep["method"]
    for recal in [info["recalibration"]] if "recalibration" in info else [r["recalibration"] for r in info["rounds"]]:
        assert recal["recalibrated"] >= 1 and recal["batches"] == 4  # all 128 toy images, batches of 32
    assert {"pruned", "recalibrated"} <= set(rep)
    assert rep["recalibrated"]["params"] == rep["pruned"]["params"] < rep["before"]["params"]
    assert "| pruned + BN recal., no fine-tune |" in res.markdown()

def test_recalibration_lifts_the_prune_only_accuracy_and_can_be_switched_off(toy_data):
    train, val = toy_data
    base = _trained(toy_data)
    on = kp.compress(base, kp.recipes.L1Finetune(target_flops=0.3, finetune=FT), train, val, latency=False)
    off = kp.compress(base, kp.recipes.L1Finetune(target_flops=0.3, finetune=FT, recal_batches=0), train, val,
                      latency=False)
    assert on.report["pruned"]["top1"] == off.report["pruned"]["top1"]  # the same cut
    assert on.report["recalibrated"]["top1"] > on.report["pruned"]["top1"]
    assert "recalibrated" not in off.report and off.report["method"]["recalibration"]["recalibrated"] == 0
    with pytest.raises(ValueError, match="recal_batches"):
        kp.recipes.L1Finetune(target_flops=0.5, recal_batches=-1)

def test_resume_after_a_kill_during_recalibration_is_exact(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    recipe = kp.recipes.L1Finetune(target_flops=0.5, finetune=kp.TrainConfig(epochs=2, batch_size=32,
                                                                             progress=False, seed=2))
    def run(out, resume):
        return kp.compress(_net(), recipe, train, val, out_dir=out, resume=resume, latency=False,
                           factory=lambda: TinyNet(width=32)).model
    ref = run(tmp_path / "ref", False)
    real, calls = recalibrate._Moments.__call__, []

    def die_on_third_batch(self, m, args):
        calls.append(1)
        if len(calls) == 3:  # one stale BatchNorm (the second): its third batch
            raise KeyboardInterrupt("killed during recalibration")
        return real(self, m, args)

    monkeypatch.setattr(recalibrate._Moments, "__call__", die_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", False)
    monkeypatch.setattr(recalibrate._Moments, "__call__", real)
    a, b = ref.state_dict(), run(tmp_path / "run", True).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

def test_adaptive_bn_keeps_the_best_scored_candidate(toy_data):
    train, val = toy_data
    sel = kp.engine.AdaptiveBN(candidates=3, images=32, batches=2)
    res = kp.compress(_trained(toy_data), kp.recipes.KDFinetune(target_params=0.4, mode=sel, finetune=FT),
                      train, val, latency=False)
    search = res.report["method"]["adaptive_bn"]
    names = [c["name"] for c in search["candidates"]]
    assert names == ["uniform", "global", "random1", "random2", "random3"]
    scores = {c["name"]: c["top1"] for c in search["candidates"] if c["top1"] is not None}
    assert search["chosen"] == max(scores, key=lambda n: (scores[n], -names.index(n)))
    applied = res.report["method"]["prune"]["mode"]  # the chosen allocation is the one applied
    assert applied == (search["chosen"] if search["chosen"] in ("uniform", "global") else "shaped")
    assert abs(res.report["after"]["params"] / res.report["before"]["params"] - 0.4) <= 0.01

def test_adaptive_bn_sees_dead_channels_that_a_uniform_rate_cannot(planted, toy_data):
    """Planted: conv1 has 28 dead channels of 32, conv2 none. A uniform rate must cut conv2's live channels
    as deep as conv1's dead ones; the adaptive-BN scores see it and do not keep the uniform plan."""
    train, val = toy_data
    net = copy.deepcopy(planted)
    sel = kp.engine.AdaptiveBN(candidates=4, images=32, batches=4)
    res = kp.compress(net, kp.recipes.L1Finetune(target_flops=0.4, mode=sel, finetune=FT), train, val,
                      latency=False)
    search = res.report["method"]["adaptive_bn"]
    scores = {c["name"]: c["top1"] for c in search["candidates"]}
    assert scores["uniform"] < scores["global"] - 10  # uniform cut live conv2 channels, global the dead ones
    assert search["chosen"] != "uniform" and scores[search["chosen"]] >= scores["global"]
    # conv2's surviving channels see what they saw: no BatchNorm went stale, none was re-estimated
    assert "recalibrated" not in res.report and res.report["pruned"]["top1"] == scores[search["chosen"]]

def test_sdap_follows_the_shape_adaptive_bn_chose(planted, toy_data):
    """SDAP's allocation by adaptive-BN: the winning candidate's per-layer cut (conv1's dead channels, conv2
    whole) is the shape SDAP's ramp follows, where its uniform twin cuts conv2's live channels too."""
    train, val = toy_data
    cfg = kp.TrainConfig(epochs=2, batch_size=16, progress=False)
    def run(mode):
        torch.manual_seed(0)
        recipe = kp.recipes.SDAP(target_flops=0.4, mode=mode, ramp_epochs=1, finetune=cfg)
        return kp.compress(copy.deepcopy(planted), recipe, train, val, latency=False)

    uni, ada = run(kp.engine.Uniform()), run(kp.engine.AdaptiveBN(candidates=4, images=32, batches=4))
    search = ada.report["method"]["adaptive_bn"]
    assert search["chosen"] != "uniform" and dict(search["shape"]) == {"conv1": 1.0, "conv2": 0.0}
    wu, wa = uni.report["widths"]["after"], ada.report["widths"]["after"]
    assert wa["conv2"] == 32 > wu["conv2"] and wa["conv1"] < wu["conv1"]
    for res in (uni, ada):  # both meet the target
        assert abs(res.report["after"]["flops"] / res.report["before"]["flops"] - 0.4) <= 0.01

def test_a_fine_tune_after_the_re_estimation_trains_the_same_weights(toy_data):
    """Train-mode BatchNorm normalises by the batch and never reads its running statistics: the
    re-estimation changes the model right after the cut (and any choice scored then), not the
    weights a fine-tune learns from it. Its running statistics are then overwritten at momentum 0.1."""
    train, val = toy_data
    base = _trained(toy_data)
    runs = [kp.compress(base, kp.recipes.L1Finetune(target_flops=0.3, finetune=FT, recal_batches=n), train, val,
                        latency=False).model for n in (30, 0)]
    (a, b) = (dict(m.named_parameters()) for m in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(x, y) for x, y in zip(runs[0].buffers(), runs[1].buffers()))
