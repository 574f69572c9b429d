"""target_latency in every recipe, under the deterministic fake latency model (no assertion on a
measured speed): recipes validate exactly one target; L1Finetune, SDAP, OED, KESI, Cascade and
EDP meet a latency target within 5% as measured (the final model's fake latency equals what the
check reports), OED's blocks are costed by latency, and the compress report names the check."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import kdprune as kp
from kdprune.engine import MeasuredWidths, RoundTo, mask_sites
from kdprune.methods.oed import OED, choose_blocks
from kdprune.metrics import Backend
from kdprune.models import create_model
from kdprune.recipes import EDP, KESI, SDAP, Cascade, KDFinetune, L1Finetune
from kdprune.training.config_io import from_dict, to_tagged_dict
from tests.engine.fake_latency import FakeLatency

from ..conftest import TinyNet, assert_resume_is_bit_exact

X = torch.zeros(1, 1, 8, 8)
FT = kp.TrainConfig(epochs=1, batch_size=32, optimizer=kp.SGD(lr=0.02), progress=False, seed=2, max_steps_per_epoch=2)
RECIPES = (L1Finetune, KDFinetune, kp.recipes.GroupNorm, SDAP, KESI, Cascade, EDP)


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeLatency:
    return FakeLatency().install(monkeypatch, tmp_path / "cache")


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_chans=1).eval()


def _kept(fake: FakeLatency, pruned: torch.nn.Module, dense: torch.nn.Module) -> float:
    return fake.model_ms(pruned, X, 1) / fake.model_ms(dense, X, 1)


@pytest.mark.parametrize("cls", [*RECIPES, OED])
def test_recipes_validate_exactly_one_target(cls):
    r = cls(target_latency=0.5, latency_batch=8, latency_backend=Backend.ONNXRUNTIME)
    t = r.target()
    assert (t.metric, t.value, t.latency_batch, t.latency_backend) == ("latency", 0.5, 8, Backend.ONNXRUNTIME)
    assert from_dict(cls, json.loads(json.dumps(to_tagged_dict(r)))) == r
    for bad in ({"target_latency": 0.5, "target_flops": 0.5}, {"target_latency": 0.5, "target_params": 0.3},
                {"target_latency": 1.5}, {"target_latency": 0.5, "latency_batch": 0}):
        with pytest.raises(ValueError):
            cls(**bad)
    with pytest.raises(ValueError, match="Backend.ONNXRUNTIME"):
        cls(target_latency=0.5, latency_backend="onnxruntime")  # typed: a name is for YAML/CLI only


def test_width_policies_on_recipes():
    r = L1Finetune(target_flops=0.5, widths=MeasuredWidths(backend=Backend.ONNXRUNTIME, batch=64))
    assert from_dict(L1Finetune, json.loads(json.dumps(to_tagged_dict(r)))) == r
    with pytest.raises(ValueError, match="round_to or widths"):
        L1Finetune(target_flops=0.5, round_to=8, widths=RoundTo(8))
    for cls in (SDAP, Cascade, EDP):
        with pytest.raises(ValueError, match="MeasuredWidths"):
            cls(target_flops=0.5, widths=MeasuredWidths())


def test_l1finetune_meets_a_latency_target(fake, toy_data):
    train, val = toy_data
    dense = TinyNet(width=32)
    res = kp.compress(dense, L1Finetune(target_latency=0.5, finetune=FT), train, val, latency=False)
    check = res.report["method"]["latency_target"]
    assert abs(check["measured"] - 0.5) <= 0.05 and check["met"] and check["entries_measured"] > 0
    assert _kept(fake, res.model, dense) == pytest.approx(check["measured"])
    assert res.report["method"]["prune"]["achieved"] == check["measured"]
    assert "latency target 0.5 (batch 1, eager" in res.markdown() and "measured" in res.markdown()


def test_sdap_meets_a_latency_target(fake, toy_data):
    train, _ = toy_data
    dense = TinyNet(width=32)
    res = kp.compress(dense, SDAP(target_latency=0.6, finetune=FT), train, None, latency=False)
    check = res.report["method"]["latency_target"]
    assert abs(check["measured"] - 0.6) <= 0.05 and _kept(fake, res.model, dense) == pytest.approx(check["measured"])


def test_oed_costs_blocks_by_latency_and_refits(monkeypatch, tmp_path):
    fake = FakeLatency(scale=1.4).install(monkeypatch, tmp_path)  # the table is off by a factor
    model = _resnet()
    sites = mask_sites(model, X)
    values = torch.tensor([1.0, 0.9, 0.2, 1.0, 0.8, 0.3, 1.0, 0.7, 0.1])
    blocks, check = choose_blocks(model, X, sites, values, OED(target_latency=0.7).target())
    pruned = copy.deepcopy(model)
    for b in sorted(blocks):
        kp.engine.apply_edit(pruned, {"op": "remove_block", "module": b}, X)
    assert abs(check.measured - 0.7) <= 0.05 and _kept(fake, pruned, model) == pytest.approx(check.measured)
    assert check.refits >= 1  # a whole-block set chosen on the raw prediction missed as measured


def test_oed_meets_a_latency_target(fake, toy_data):
    train, val = toy_data
    recipe = OED(replicas=2, lam=0.5, target_latency=0.7, commit_at=0.25, ramp=0.25, select_val=20,
                 finetune=kp.TrainConfig(epochs=2, batch_size=32, optimizer=kp.SGD(lr=0.05), progress=False, seed=3))
    res = kp.compress(_resnet(), recipe, train, val, latency=False)
    check = res.report["method"]["latency_target"]
    assert abs(check["measured"] - 0.7) <= 0.05
    assert _kept(fake, res.model, _resnet()) == pytest.approx(check["measured"])


@pytest.mark.parametrize("recipe", [
    KESI(target_latency=0.6, rounds=2, finetune=FT, distill_epochs=0),
    Cascade(target_latency=0.6, assistants=1, cascade=FT, finetune=FT, prune_every=1),
    EDP(target_latency=0.8, sparse=FT, finetune=FT, lam_col=2.0, lam_row=2.0),
], ids=["kesi", "cascade", "edp"])
def test_other_recipes_meet_a_latency_target(fake, toy_data, recipe):
    train, val = toy_data
    res = kp.compress(_resnet(), recipe, train, val, latency=False)
    check = res.report["method"]["latency_target"]
    goal = recipe.target().value
    assert abs(check["measured"] - goal) <= 0.05
    assert _kept(fake, res.model, _resnet()) == pytest.approx(check["measured"])


def test_report_has_an_onnxruntime_column_when_installed(toy_data):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kdprune.methods.compress import _latency, report_markdown
    torch.manual_seed(0)
    dense, x = TinyNet(), torch.zeros(1, 1, 8, 8)
    lat = _latency(dense, TinyNet(width=4), x)
    assert set(lat) == {"latency_ms", "latency_onnxruntime_ms"}
    assert set(lat["latency_onnxruntime_ms"]) == {"before", "after"} and set(lat["latency_ms"]["after"]) == {"1", "64"}
    report = {"recipe": {"type": "L1Finetune"}, "before": {"params": 10, "flops": 10, "top1": 50.0},
              "after": {"params": 5, "flops": 5, "top1": 49.0}, "wall_time_s": 1.0,
              "widths": {"before": {}, "after": {}}, "method": {}, **lat}
    md = report_markdown(report)
    assert "ORT ms bs1" in md and "ORT ms bs64" in md and "CPU ms bs1" in md and "onnxruntime bs1" in md


def test_a_resumed_latency_run_re_applies_its_recorded_cut(fake, toy_data, tmp_path, monkeypatch):
    """The latency search is measured: a resume that searched again could pick other widths than
    the checkpoint's (issue 34). The cut is recorded and re-applied; the resumed run equals the
    uninterrupted one even when the machine now times differently."""
    train, val = toy_data
    recipe = L1Finetune(target_latency=0.5, finetune=kp.TrainConfig(epochs=2, batch_size=32, progress=False, seed=2))

    def run(out, resume):
        torch.manual_seed(0)
        return kp.compress(TinyNet(width=32), recipe, train, val, out_dir=out, resume=resume, latency=False,
                           factory=lambda: TinyNet(width=32)).model

    def machine_changed():  # it times differently now: a new search would pick other widths
        fake.scale, fake.overhead = 1.7, 2.0

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch, before_resume=machine_changed)
