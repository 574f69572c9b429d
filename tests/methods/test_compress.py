"""compress + baseline recipes on tiny models: targets met, input untouched, saved, resumable."""
import dataclasses
import json

import pytest
import torch

import kdprune as kp

from ..conftest import TinyNet, assert_resume_is_bit_exact, make_images

FT = kp.TrainConfig(epochs=2, batch_size=32, optimizer=kp.SGD(lr=0.02), progress=False, seed=2)


def _net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(width=32)


@pytest.mark.parametrize("recipe", [
    kp.recipes.L1Finetune(target_flops=0.5, finetune=FT),
    kp.recipes.KDFinetune(target_params=0.4, finetune=FT),
    kp.recipes.GroupNorm(target_flops=0.6, finetune=FT, sparse=FT),
])
def test_recipes_meet_target_and_leave_input_untouched(recipe, toy_data, tmp_path):
    train, val = toy_data
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = kp.compress(model, recipe, train, val, out_dir=tmp_path, latency=False, factory=TinyNet32)
    key = "flops" if recipe.target_flops else "params"
    kept = res.report["after"][key] / res.report["before"][key]
    assert abs(kept - recipe.target().value) <= 0.01
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("mask" in n or "gate" in n for n, _ in res.model.named_buffers())
    loaded = kp.load_pruned(tmp_path / "model", factory=TinyNet32)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(x), res.model(x))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["recipe"]["type"] == type(recipe).__name__ and "git_commit" in saved["meta"]
    md = (tmp_path / "report.md").read_text()
    assert "| after |" in md and "top-1 on the validation set" in md  # no test set given: it says so


def TinyNet32() -> TinyNet:
    """Factory for save/load of the test model."""
    return TinyNet(width=32)


def test_l1_and_kd_prune_the_same_channels(toy_data):
    train, val = toy_data
    a = kp.compress(_net(), kp.recipes.L1Finetune(target_flops=0.5, finetune=FT), train, val, latency=False)
    b = kp.compress(_net(), kp.recipes.KDFinetune(target_flops=0.5, finetune=FT), train, val, latency=False)
    assert a.report["widths"]["after"] == b.report["widths"]["after"]
    assert a.report["method"]["prune"] == b.report["method"]["prune"]


def test_resume_after_kill_during_finetune(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    recipe = kp.recipes.L1Finetune(target_flops=0.5, finetune=FT)

    def run(out, resume):
        return kp.compress(_net(), recipe, train, val, out_dir=out, resume=resume, latency=False,
                           factory=TinyNet32).model

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch)


def test_bad_recipe_and_target(toy_data):
    train, val = toy_data
    with pytest.raises(TypeError, match="not a kdprune recipe"):
        kp.compress(_net(), object(), train, val)
    with pytest.raises(ValueError, match="must be a fraction to keep"):
        kp.compress(_net(), kp.recipes.L1Finetune(target_flops=1.5), train, val)
    with pytest.raises(ValueError, match="exactly one"):
        kp.compress(_net(), kp.recipes.L1Finetune(), train, val)


def test_control_is_the_dense_model_trained_the_same_epochs(toy_data, tmp_path):
    train, val = toy_data
    recipe = kp.recipes.KDFinetune(target_flops=0.5, finetune=FT)  # KD freezes the dense copy as its teacher
    res = kp.compress(_net(), recipe, train, val, out_dir=tmp_path, latency=False, control_epochs=2, factory=TinyNet32)
    control = res.report["control"]
    assert control["epochs"] == 2 and control["params"] == res.report["before"]["params"]
    torch.manual_seed(0)  # the same run by hand: the dense model, the fine-tune's settings, 2 epochs
    ref = kp.train(_net(), train, val, FT).model
    assert control["top1"] == kp.training.evaluate(ref, val)["top1"]
    assert "| dense + 2 epoch(s) |" in res.markdown()
    with pytest.raises(ValueError, match="control_epochs"):
        kp.compress(_net(), recipe, train, val, latency=False, control_epochs=0)


def test_resume_under_another_recipe_is_refused(toy_data, tmp_path):
    train, val = toy_data
    one = dataclasses.replace(FT, epochs=1)
    l1 = kp.recipes.L1Finetune(target_flops=0.5, finetune=one)
    kp.compress(_net(), l1, train, val, out_dir=tmp_path, latency=False, factory=TinyNet32)
    for other, changed in ((kp.recipes.KDFinetune(target_flops=0.5, finetune=one), "type"),
                           (kp.recipes.L1Finetune(target_flops=0.6, finetune=one), "target_flops")):
        with pytest.raises(ValueError, match=f"holds a L1Finetune run; resuming it as .* would change .*{changed}"):
            kp.compress(_net(), other, train, val, out_dir=tmp_path, resume=True, latency=False, factory=TinyNet32)
    how = dataclasses.replace(l1, finetune=dataclasses.replace(one, threads=1, progress=True))  # how, not what
    kp.compress(_net(), how, train, val, out_dir=tmp_path, resume=True, latency=False, factory=TinyNet32)


def test_data_that_does_not_fit_the_model_fails_before_anything_runs(toy_data):
    train, val = toy_data
    recipe = kp.recipes.L1Finetune(target_flops=0.5, finetune=FT)
    rgb = make_images(16, chans=3)
    with pytest.raises(ValueError, match="in_chans=1 but the data has 3 channels"):
        kp.compress(_net(), recipe, rgb, None, latency=False)
    ten = make_images(16, classes=10)
    with pytest.raises(ValueError, match="4 outputs but the data has 10 classes; create the model with num_classes=10"):
        kp.compress(_net(), recipe, ten, None, latency=False)
    vectors = torch.utils.data.TensorDataset(torch.randn(16, 64), torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"samples have shape \(64,\).*takes \[C, H, W\] images"):
        kp.compress(_net(), recipe, vectors, None, latency=False)


def test_a_user_model_saved_without_its_factory_fails_before_training(toy_data, tmp_path, monkeypatch):
    from kdprune.training import loop

    train, val = toy_data
    monkeypatch.setattr(loop, "_run_epochs", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match="no factory was given"):
        kp.compress(_net(), kp.recipes.L1Finetune(target_flops=0.5, finetune=FT), train, val, out_dir=tmp_path,
                    latency=False)


def test_a_field_added_since_a_run_started_changes_nothing_at_its_default():
    from kdprune.methods.compress import identity_changes, recipe_identity

    recipe = kp.recipes.L1Finetune(target_flops=0.5)
    recorded = {k: v for k, v in recipe_identity(recipe).items() if k != "ignored_layers"}  # an older record
    assert identity_changes(recorded, recipe) == []
    assert identity_changes(recorded, dataclasses.replace(recipe, ignored_layers=("fc",))) == ["ignored_layers"]
    assert identity_changes(recorded, dataclasses.replace(recipe, target_flops=0.4)) == ["target_flops"]
