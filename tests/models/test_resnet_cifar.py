"""CIFAR ResNets (He et al. 2016): contract, exact param counts, MACs, option-A/B shortcuts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdprune.metrics import complexity, count_params
from kdprune.models import CifarResNet, PadShortcut, create_model

# Param counts with 10 classes, 3 input channels, shortcut A: the values reported by He et al. 2016
# Table 6 (0.27M / 0.46M / 0.66M / 0.85M / 1.7M) as exact counts of the reference implementation
# akamaster/pytorch_resnet_cifar10 (README table).
PARAMS_A = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
}


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_contract_and_stage_shapes(run_contract, name, in_chans, size):
    _, inter = run_contract(name, in_chans, size)
    assert [tuple(t.shape[1:]) for t in inter] == [
        (16, size, size), (32, size // 2, size // 2), (64, size // 4, size // 4)]


@pytest.mark.parametrize("name", ["resnet32", "resnet44", "resnet110"])
def test_contract_other_depths(run_contract, name):
    run_contract(name, 1, 28)


def test_contract_shortcut_b(run_contract):
    model, _ = run_contract("resnet20", 3, 32, shortcut="B")
    assert not any(isinstance(m, PadShortcut) for m in model.modules())


@pytest.mark.parametrize("name,params", sorted(PARAMS_A.items()))
def test_param_counts_option_a(name, params):
    assert count_params(create_model(name)) == params


def test_param_count_option_b():
    # Option B adds two 1x1 conv+BN projections: 16*32 + 2*32 and 32*64 + 2*64.
    model = create_model("resnet56", shortcut="B")
    assert count_params(model) == PARAMS_A["resnet56"] + (512 + 64) + (2048 + 128)


def test_in_chans_and_classes_change_counts():
    # 1-channel stem drops 2*16*9 weights; 100 classes add 90*(64+1).
    base = PARAMS_A["resnet20"]
    assert count_params(create_model("resnet20", in_chans=1)) == base - 2 * 16 * 9
    assert count_params(create_model("resnet20", num_classes=100)) == base + 90 * 65


def test_resnet56_macs():
    # 125.5M MACs at 32x32 is the figure used across the pruning literature (e.g. HRank, DepGraph).
    macs = complexity(create_model("resnet56"), input_size=(1, 3, 32, 32)).macs
    assert abs(macs - 125.5e6) / 125.5e6 < 0.02


def test_pad_shortcut_subsamples_and_zero_pads():
    sc = PadShortcut(16, 32, stride=2)
    assert (sc.in_planes, sc.out_planes, sc.stride) == (16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    assert list(sc.parameters()) == []
    torch.testing.assert_close(PadShortcut(4, 4)(x[:, :4]), x[:, :4])


def test_option_a_uses_pad_shortcut_modules():
    model = create_model("resnet20")
    pads = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert [(p.in_planes, p.out_planes, p.stride) for p in pads] == [(16, 32, 2), (32, 64, 2)]
    assert isinstance(model.layer2[0].shortcut, PadShortcut)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)


@pytest.mark.parametrize("kwargs", [{"depth": 21}, {"shortcut": "C"}])
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        CifarResNet(**kwargs)


def test_class_attributes():
    model = create_model("resnet20")
    assert model.feature_modules == ["layer1", "layer2", "layer3"]
    assert model.classifier_name == "fc" and model.fc.in_features == 64
