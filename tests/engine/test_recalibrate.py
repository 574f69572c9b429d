"""BatchNorm re-estimation after an edit: the statistics are the exact moments of each stale
BatchNorm's input over the same batches; BatchNorms the edit left alone keep theirs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.data import as_loader
from kdprune.engine import (PruningPlan, Recalibrate, affected_norms, apply_plan, batch_norms, channel_groups,
                            recalibrate_norms)

from ..conftest import TinyNet, make_images
from .tiny_models import ChainNet

X = torch.zeros(1, 3, 8, 8)


def _stale(net: nn.Module) -> nn.Module:
    """``net`` with running statistics no input has: what a pruned net's stale BatchNorms look like."""
    for bn in batch_norms(net).values():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)
    return net


def _inputs_in_train_mode(net: nn.Module, data, cfg: Recalibrate) -> dict[str, torch.Tensor]:
    """Each BatchNorm's input over the same batches, every BatchNorm normalising by its batch."""
    net, seen = copy.deepcopy(net).train(), {}
    for n, bn in batch_norms(net).items():
        bn.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].detach()) and None)
    with torch.no_grad():
        for _, (x, _y) in zip(range(cfg.batches), as_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed)):
            net(x)
    return {n: torch.cat(v) for n, v in seen.items()}


def test_statistics_are_the_moments_of_each_input_over_the_same_batches():
    torch.manual_seed(0)
    net = _stale(TinyNet(in_chans=3, width=6))
    data, cfg = make_images(80, chans=3, seed=2), Recalibrate(batches=3, batch_size=16, seed=5)
    want = _inputs_in_train_mode(net, data, cfg)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "batches" not in k}
    rep = recalibrate_norms(net, data, cfg)
    assert rep.norms == ("features.1", "features.4") and rep.batches == 3 and rep.images == 48
    for n, bn in batch_norms(net).items():
        z = want[n].double()
        torch.testing.assert_close(bn.running_mean.double(), z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), z.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())
    assert not net.training


def test_eval_output_equals_a_hand_computed_reference():
    torch.manual_seed(1)
    conv, bn, fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
    nn.init.uniform_(bn.weight, 0.5, 2.0), nn.init.uniform_(bn.bias, -1.0, 1.0)
    net = _stale(nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc))
    data = make_images(32, chans=3, seed=3)
    recalibrate_norms(net, data, Recalibrate(batches=2, batch_size=16))  # 2 x 16: every image once
    x = as_loader(data, 32, shuffle=False).__iter__().__next__()[0]
    with torch.no_grad():
        z = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=True)
        y = (z - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
        y = y * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
        ref = F.linear(F.relu(y).mean((2, 3)), fc.weight.double(), fc.bias.double())
        torch.testing.assert_close(net(x).double(), ref, rtol=1e-4, atol=1e-5)


def _prune(net: nn.Module, root_like: str, n: int) -> nn.Module:
    """A pruned copy of ``net``: the ``n`` first channels of the group rooted at ``root_like`` removed."""
    pruned = copy.deepcopy(net)
    groups = channel_groups(pruned, X)
    root = next(g.root for g in groups if g.root == root_like)
    apply_plan(pruned, X, PruningPlan({root: tuple(range(n))}), groups)
    return pruned


def _trained_chain() -> ChainNet:
    torch.manual_seed(0)
    net = ChainNet()
    recalibrate_norms(net, make_images(64, chans=3, seed=4), Recalibrate(batches=4, batch_size=16))
    return net


def test_only_batchnorms_whose_input_changed_are_re_estimated():
    dense = _trained_chain()
    pruned = _stale_bn3(_prune(dense, "conv2", 5))  # conv3's input lost channels: bn3 is stale, bn1 not
    bn1 = {k: v.clone() for k, v in pruned.bn1.state_dict().items()}
    assert affected_norms(dense, pruned, torch.randn(4, 3, 8, 8)) == ["bn3"]
    rep = recalibrate_norms(pruned, make_images(64, chans=3, seed=4), Recalibrate(batches=2, batch_size=16),
                            before=dense)
    assert rep.norms == ("bn3",) and rep.kept == ("bn1",)
    assert all(torch.equal(pruned.bn1.state_dict()[k], v) for k, v in bn1.items())
    assert not torch.allclose(pruned.bn3.running_mean, torch.full_like(pruned.bn3.running_mean, 3.0))


def _stale_bn3(net: ChainNet) -> ChainNet:
    net.bn3.running_mean.fill_(3.0)
    return net


def test_an_output_pruned_batchnorm_keeps_its_surviving_channels_statistics():
    dense = _trained_chain()
    pruned = _prune(dense, "conv3", 6)  # bn3 loses channels, but the survivors see what they saw
    assert affected_norms(dense, pruned, torch.randn(4, 3, 8, 8)) == []
    want = pruned.bn3.running_mean.clone()
    recalibrate_norms(pruned, make_images(64, chans=3, seed=4), Recalibrate(batches=2, batch_size=16), before=dense)
    assert torch.equal(pruned.bn3.running_mean, want)


def test_model_without_batchnorm_is_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 1, 8, 8))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rep = recalibrate_norms(net, make_images(16), Recalibrate(batches=2, batch_size=8))
    assert rep.norms == () and rep.batches == 0
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_zero_batches_is_off_and_bad_settings_fail():
    net = _stale(TinyNet())
    rep = recalibrate_norms(net, make_images(16), Recalibrate(batches=0))
    assert rep.norms == () and float(net.features[1].running_mean[0]) == 3.0
    with pytest.raises(ValueError, match="batches >= 0"):
        Recalibrate(batches=-1)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_norms(net, torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)),
                          Recalibrate(batches=1))


def test_dropout_is_off_during_the_re_estimation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Dropout(0.9), nn.BatchNorm2d(3))
    data = make_images(32, seed=5)
    recalibrate_norms(net, data, Recalibrate(batches=2, batch_size=16))
    x = as_loader(data, 32, shuffle=False).__iter__().__next__()[0]
    with torch.no_grad():
        z = net[0](x)
    torch.testing.assert_close(net[2].running_mean, z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
