"""EDP: the decomposed model equals the original, the coefficient families are A's columns (rank)
and rows (coupled output channels, only where every producer is a coefficient conv), the target is
met within 1% on the merged model, the result replays bit-exactly in a fresh process, KD is an
option, reports name the original layers, and kill + resume equals an uninterrupted run."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import kdprune as kp
from kdprune.cli.recipe_flags import methods
from kdprune.engine import DecomposedConv, apply_edit, channel_groups, decomposed_convs
from kdprune.methods.edp import (EDP, AllConvs, Conv3x3, MergeByFlops, MergeByLatency, Named, edp_families,
                                 merge_decisions)
from kdprune.models import create_model
from kdprune.training.config_io import from_dict, to_tagged_dict

from ..conftest import TinyNet, assert_resume_is_bit_exact

X = torch.zeros(1, 1, 8, 8)
CFG = kp.TrainConfig(epochs=2, batch_size=32, optimizer=kp.SGD(lr=0.05), progress=False, seed=3)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=4, in_chans=1).eval()


def _decomposed(model: nn.Module, names) -> nn.Module:
    for n in names:
        apply_edit(model, {"op": "decompose_conv", "module": n}, X)
    return model


def test_recipe_registration_validation_and_json():
    assert kp.recipes.EDP is EDP and methods()["edp"] is EDP
    r = EDP(target_flops=0.5, lam_col=0.1, layers=Named(("conv1",)), merge=MergeByLatency(batch=4), kd_alpha=0.5)
    assert from_dict(EDP, json.loads(json.dumps(to_tagged_dict(r)))) == r
    for bad in ({"lam_col": -1.0}, {"kd_alpha": 1.5}, {"temperature": 0.0}, {"layers": "conv3x3"}):
        with pytest.raises((ValueError, TypeError)):
            EDP(target_flops=0.5, **bad)
    with pytest.raises(ValueError, match="exactly one"):
        EDP().target()  # a target is required


def test_layer_selectors():
    m = _resnet()
    three = Conv3x3().select(m)
    assert "conv1" in three and "layer2.0.conv1" in three and all("shortcut" not in n for n in three)
    assert set(three) <= set(AllConvs().select(m))
    with pytest.raises(ValueError, match="not ungrouped nn.Conv2d"):
        Named(("layer1.0.bn1",)).select(m)


def test_the_decomposed_model_equals_the_original():
    m = _resnet()
    x = torch.randn(3, 1, 8, 8)
    ref = m(x)
    _decomposed(m, Conv3x3().select(m))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_families_are_columns_and_only_fully_decomposed_coupled_rows():
    m = _resnet()
    _decomposed(m, Conv3x3().select(m))
    groups = channel_groups(m, X)
    fams = edp_families(m, groups, lam_col=0.1, lam_row=0.2)
    for n in decomposed_convs(m):
        col = fams[f"{n}.basis"]
        assert col.dims == (1,) and col.params[0] is m.get_submodule(f"{n}.coeff").weight and col.lam == 0.1
    stream = next(f for r, f in fams.items() if len(f.params) > 1)  # a residual stream: several coeffs' rows
    assert all(d == 0 for d in stream.dims) and stream.lam == 0.2
    # A at init is the identity: every column and every single-member row has norm 1
    assert torch.allclose(fams["layer1.0.conv1.basis"].norms(), torch.ones(16))
    # With one conv of the stream left plain, the stream gets no row family (notes: coupled rows only as a whole)
    m2 = _resnet()
    _decomposed(m2, [n for n in Conv3x3().select(m2) if n != "conv1"])
    fams2 = edp_families(m2, channel_groups(m2, X), 0.1, 0.2)
    stream_roots = [r for r, f in fams2.items() if len(f.params) > 1]
    coeff_weights = {id(m2.get_submodule("layer1.0.conv2.coeff").weight)}
    assert not any(id(p) in coeff_weights for r in stream_roots for p in fams2[r].params)


@pytest.mark.parametrize("target", [{"target_flops": 0.5}, {"target_params": 0.4}])
def test_target_is_met_within_one_percent_on_the_merged_model(toy_data, target):
    train, val = toy_data
    res = kp.compress(_resnet(), EDP(**target, sparse=CFG, finetune=CFG, lam_col=2.0, lam_row=2.0), train, val,
                      latency=False)
    metric = "flops" if "target_flops" in target else "params"
    kept = res.report["after"][metric] / res.report["before"][metric]
    assert abs(kept - list(target.values())[0]) <= 0.01
    info = res.report["method"]
    assert set(info["layers"]) == set(Conv3x3().select(_resnet()))  # named by the original model
    for n, w in info["layers"].items():
        mod = res.model.get_submodule(n)
        assert w["merged"] == (not isinstance(mod, DecomposedConv)) and w["out"] == mod.out_channels
    ops = [e["op"] for e in res.model.kdprune_structure]
    assert ops[0] == "decompose_conv" and "prune_channels" in ops and ops[-1] == "merge_conv"


def test_merge_decisions_follow_the_rule_and_latency_is_cached():
    m = _resnet()
    _decomposed(m, ["layer1.0.conv1"])
    assert merge_decisions(m, X, MergeByFlops()) == {"layer1.0.conv1": True}  # full rank: one conv is cheaper
    rule = MergeByLatency(rounds=3)
    first = merge_decisions(m, X, rule)
    assert first == merge_decisions(m, X, rule) and isinstance(first["layer1.0.conv1"], bool)


def test_result_replays_bit_exactly_in_a_fresh_process(toy_data, tmp_path):
    train, val = toy_data
    recipe = EDP(target_flops=0.9, sparse=CFG, finetune=CFG, lam_col=2.0, lam_row=2.0,
                 layers=Named(("layer2.0.conv1", "layer3.1.conv2")))
    res = kp.compress(_resnet(), recipe, train, val, out_dir=tmp_path / "run", latency=False)
    x = torch.randn(2, 1, 8, 8)  # one thread on both sides: the conv kernels' summation order depends on it
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, kdprune as kp; from safetensors.torch import save_file; d = sys.argv[1]; "
            "torch.set_num_threads(1); m = kp.load_pruned(d + '/run/model').eval(); x = torch.load(d + '/x.pt');"
            "save_file({'y': m(x).detach()}, d + '/y.safetensors')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=120)
    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], res.model.eval()(x).detach())


def test_kd_extension_and_a_model_without_matching_convs(toy_data):
    train, val = toy_data
    res = kp.compress(_resnet(), EDP(target_flops=0.6, sparse=CFG, finetune=CFG, kd_alpha=0.5), train, val,
                      latency=False)
    assert any("kd" in k for k in res.report["method"]["finetune"][0])  # the KD term was trained
    with pytest.raises(ValueError, match="nothing to decompose"):
        kp.compress(TinyNet(), EDP(target_flops=0.5, layers=Named(()), sparse=CFG, finetune=CFG), train, val,
                    latency=False)


def test_resume_after_kill_is_bit_exact(toy_data, tmp_path, monkeypatch):
    train, val = toy_data
    recipe = EDP(target_flops=0.6, sparse=CFG, finetune=CFG, lam_col=2.0, lam_row=2.0)

    def run(out, resume):
        return kp.compress(_resnet(), recipe, train, val, out_dir=out, resume=resume, latency=False).model

    assert_resume_is_bit_exact(run, tmp_path, monkeypatch)


def test_contribution_scores_are_filter_norms_at_init_and_follow_the_coefficients():
    from kdprune.methods.edp import contribution
    m = _resnet()
    w = m.get_submodule("layer1.0.conv1").weight.detach().flatten(1).norm(dim=1)
    _decomposed(m, Conv3x3().select(m))
    groups = {g.root: g for g in channel_groups(m, X)}
    col = contribution(m, groups["layer1.0.conv1.basis"])
    row_root = next(r for r, g in groups.items() if any(p.name == "layer1.0.conv1.coeff" for p in g.producers))
    torch.testing.assert_close(col, w)  # A = I: ||A[:, j]|| ||B_j|| = ||W_j||
    torch.testing.assert_close(contribution(m, groups[row_root]).float(), w)  # (A B)_i = W_i
    with torch.no_grad():
        m.get_submodule("layer1.0.conv1.coeff").weight[:, 3] = 0.0  # basis filter 3 unused
    assert contribution(m, groups["layer1.0.conv1.basis"])[3] == 0
    assert contribution(m, groups[row_root])[3] == 0  # and output row 3 is empty too


def _directional(fam, loss_of) -> torch.Tensor:
    """d loss / d s of every group of ``fam`` scaled by s (at s = 1): sum over the group of grad * param."""
    for p in fam.params:
        p.grad = None
    loss_of().backward()
    out = None
    for p, dim, idx in zip(fam.params, fam.dims, fam.index):
        gp = (p.grad * p).detach()
        per = gp.sum(dim=[d for d in range(p.dim()) if d != dim]) if p.dim() > 1 else gp
        out = per[idx] if out is None else out + per[idx]
    return out


def test_a_row_group_of_bn_scaled_carries_loss_gradient_where_a_coefficient_row_carries_none():
    """The invariance (issue 29): a coefficient conv's row feeds a train-mode BatchNorm, so scaling it
    leaves the loss unchanged (zero directional gradient, whatever the data); the BatchNorm's (gamma,
    beta) of the same channel is the output scale, and the loss moves with it."""
    from kdprune.methods.edp import BNScaled
    torch.manual_seed(0)
    m = _decomposed(TinyNet(width=8), ["features.0", "features.3"]).train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    groups = channel_groups(m, X)
    paper = edp_families(m, groups, 0.1, 0.1)
    ours = edp_families(m, groups, 0.1, 0.1, BNScaled())
    rows = [r for r in ours if not r.endswith(".basis")]
    assert rows and all(ours[r].params[0] is not paper[r].params[0] for r in rows)
    for r in rows:
        assert _directional(paper[r], loss).abs().max() < 1e-5  # A's row: BatchNorm undoes it (up to its eps)
        assert _directional(ours[r], loss).abs().max() > 1e-3  # (gamma, beta): the loss sees it


def test_a_net_of_grouped_convs_meets_its_target_through_the_other_groups():
    """Issue 29: only ungrouped convs decompose, so on a ResNeXt-style net (grouped 3x3 in every block)
    the coefficient families alone kept at least 0.98 of the FLOPs; the groups no decomposed layer carries
    are now cut by their filters' L1 norms beside them."""
    from torch.utils.data import TensorDataset

    from ..engine.constructs import ResNeXtNet

    g = torch.Generator().manual_seed(0)
    y, x = torch.randint(0, 10, (64,), generator=g), torch.randn(64, 3, 16, 16, generator=g)
    tiny = kp.TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, augment=False, progress=False)
    torch.manual_seed(0)
    res = kp.compress(ResNeXtNet(), kp.recipes.EDP(target_flops=0.5, sparse=tiny, finetune=tiny),
                      TensorDataset(x, y), TensorDataset(x[:16], y[:16]), latency=False)
    assert abs(res.report["after"]["flops"] / res.report["before"]["flops"] - 0.5) <= 0.01
    assert res.report["method"]["prune"]["other_groups"] > 0
