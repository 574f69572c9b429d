"""Cascade: activation Taylor saliency equals the autograd product, one model's saliency never sees
another's loss, masks stay nested at every pruning event, each masked model equals its physically
pruned one, the target lands within 1% with 0-2 assistants, kill + resume equals an
uninterrupted run, the assistants come back and are saved."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import kdprune as kp
from kdprune.cli.recipe_flags import methods
from kdprune.distill import kd_loss
from kdprune.engine import MaskSlots, channel_groups
from kdprune.methods.cascade import Cascade, CascadePruner, CascadeTask, extract, levels
from kdprune.models import create_model
from kdprune.training.config_io import from_dict, to_tagged_dict

from ..conftest import assert_resume_is_bit_exact
from ..engine.tiny_models import ChainNet, randomize

X = torch.zeros(1, 1, 8, 8)
CFG = kp.TrainConfig(epochs=2, batch_size=32, optimizer=kp.SGD(lr=0.05), progress=False, seed=3)


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_chans=1).eval()


def _chain() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(ChainNet(in_chans=1, num_classes=4), torch.zeros(1, 1, 8, 8)).train()


def test_recipe_levels_validation_and_json():
    assert kp.recipes.Cascade is Cascade and methods()["cascade"] is Cascade
    assert levels(Cascade(target_flops=0.4, assistants=2)) == pytest.approx([0.8, 0.6, 0.4])
    assert levels(Cascade(target_flops=0.4, assistants=0)) == [0.4]
    r = Cascade(target_params=0.25, assistants=1, levels=(0.6,), prune_every=7)
    assert from_dict(Cascade, json.loads(json.dumps(to_tagged_dict(r)))) == r
    for bad in ({"assistants": -1}, {"levels": (0.3,), "assistants": 1}, {"levels": (0.6, 0.8)},
                {"prune_every": 0}, {"round_to": 8}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            Cascade(target_flops=0.5, **bad)


def test_mask_gradient_is_the_activation_taylor_product():
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    ref = _chain()
    acts = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            acts[name] = out
        return hook

    groups = channel_groups(_chain(), X)
    sites = {s for g in groups for s in g.sites}
    for s in sites:
        ref.get_submodule(s).register_forward_hook(keep(s))
    F.cross_entropy(ref(x), y).backward()
    model = _chain()
    masks = MaskSlots(groups, 1).attach(model)
    F.cross_entropy(model(x), y).backward()
    for g in groups:
        (site,) = g.sites
        a = acts[site]
        want = (a * a.grad).sum(dim=(0, 2, 3))  # sum over batch, h, w of a * dL/da
        torch.testing.assert_close(masks.rows(g).grad[0], want, rtol=1e-5, atol=1e-7)


def test_each_model_saliency_comes_from_its_own_loss_only():
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    teacher, model = _chain().eval(), _chain()
    groups = channel_groups(_chain(), X)
    masks = MaskSlots(groups, 2).attach(model)
    with torch.no_grad():
        masks.rows(groups[0])[1, :3] = 0.0  # the smaller model lacks three channels
    task = CascadeTask(teacher, masks, temperature=2.0, alpha=0.7)
    _, terms = task(model, x, y)
    sum(terms.values()).backward()
    full = {g.root: masks.rows(g).grad.clone() for g in groups}
    for k in range(2):  # each model's loss alone, with the same teachers
        model.zero_grad()
        masks.slot = 0
        z0 = model(x)
        with torch.no_grad():
            zt = teacher(x)
        loss = F.cross_entropy(z0, y) + 0.7 * kd_loss(z0, zt, 2.0)
        if k == 1:
            masks.slot = 1
            z1 = model(x)
            loss = F.cross_entropy(z1, y) + 0.7 * kd_loss(z1, z0.detach(), 2.0)
        loss.backward()
        for g in groups:
            torch.testing.assert_close(full[g.root][k], masks.rows(g).grad[k], rtol=1e-5, atol=1e-7)


def _pruner(model, recipe, events=4):
    skeleton = copy.deepcopy(model)
    groups = channel_groups(copy.deepcopy(skeleton), X)
    masks = MaskSlots(groups, len(levels(recipe))).attach(model)
    return CascadePruner(masks, skeleton, groups, X, recipe, events), masks


def test_masks_stay_nested_and_each_masked_model_equals_its_pruned_model():
    model = _resnet()
    recipe = Cascade(target_flops=0.4, assistants=2, mode=kp.engine.Global())
    pruner, masks = _pruner(model, recipe)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    for event in range(pruner.events):
        for sal in pruner.saliency:
            for r in sal:
                sal[r] += torch.rand(sal[r].shape, generator=g, dtype=torch.float64)
        pruner.prune(event)
        for k in range(1, 3):
            assert all(pruner.removed[k - 1][r] <= pruner.removed[k][r] for r in pruner.removed[k])
        for gr in pruner.groups:
            rows = masks.rows(gr).detach()
            assert bool((rows[1:] <= rows[:-1]).all())  # nested masks on every group
    assert [h["kept"] for h in pruner.history][-1] == pytest.approx([0.8, 0.6, 0.4], abs=0.01)
    model.eval()
    for k, rem in enumerate(pruner.removed):
        masks.slot = k
        with torch.no_grad():
            torch.testing.assert_close(extract(model, rem, X).eval()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("assistants", [0, 1, 2])
def test_target_within_one_percent_and_assistants_returned(toy_data, tmp_path, assistants):
    train, val = toy_data
    recipe = Cascade(target_flops=0.5, assistants=assistants, cascade=CFG, finetune=CFG, prune_every=2)
    res = kp.compress(_resnet(), recipe, train, val, out_dir=tmp_path, latency=False)
    kept = res.report["method"]["flops_kept"]
    assert abs(kept[-1] - 0.5) <= 0.01 and len(kept) == assistants + 1
    assert abs(res.report["after"]["flops"] / res.report["before"]["flops"] - 0.5) <= 0.01
    assert sorted(res.extras) == [f"assistants/ta{i + 1}" for i in range(assistants)]
    assert res.report["method"]["recalibration"]["recalibrated"] >= 1 and "recalibrated" in res.report
    for i, (name, m) in enumerate(sorted(res.extras.items())):
        back = kp.load_pruned(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(back.eval()(X), m.eval()(X))
        assert abs(kp.complexity(m, example_input=X).flops / res.report["before"]["flops"] - kept[i]) < 1e-9


def test_resume_after_kill_is_bit_exact(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    recipe = Cascade(target_flops=0.5, assistants=1, cascade=CFG, finetune=CFG, prune_every=2)

    def run(out, resume):
        return kp.compress(_resnet(), recipe, train, val, out_dir=out, resume=resume, latency=False).model

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch)
