"""recalibrate_bn: the re-estimated BN statistics are the data's own, nothing else changes."""
from __future__ import annotations

import torch
from torch import nn

from torch.utils.data import TensorDataset

from kdprune.training import recalibrate_bn


def _data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 6, 6, generator=g), torch.arange(n) % 3)


def test_recalibrated_statistics_equal_the_data_moments():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    net[1].running_mean.fill_(5.0)
    net[1].running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    data = _data()
    out = recalibrate_bn(net, data, batches=3, batch_size=16)
    with torch.no_grad():
        z = net[0](data.tensors[0])
    # three equal batches averaged cumulatively: whatever the shuffle, the mean is the data's
    assert out is net and not net.training
    torch.testing.assert_close(net[1].running_mean, z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert net[1].momentum == 0.3
    assert int(net[1].num_batches_tracked) == 3
    for k, v in weights.items():
        assert torch.equal(net.state_dict()[k], v)


def test_single_full_batch_gives_the_unbiased_variance():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    data = _data(32)
    recalibrate_bn(net, data, batches=1, batch_size=32)
    with torch.no_grad():
        z = net[0](data.tensors[0])
    torch.testing.assert_close(net[1].running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)


def test_model_without_bn_is_returned_in_eval_mode():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).train()
    assert not recalibrate_bn(net, _data(8)).training
