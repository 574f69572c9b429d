"""Wide ResNets (Zagoruyko & Komodakis 2016)."""
from __future__ import annotations

import pytest
from torch import nn

from kdprune.metrics import count_params
from kdprune.models import WideResNet, create_model, wrn

# 10 classes, 3 in-channels. WRN-28-10 = 36,479,194 is the count of the widely used
# xternalz/WideResNet-pytorch (paper Table 4: 36.5M). WRN-16-8 = 10,961,370 by hand
# (paper: 11.0M): stem 432; block1 168,224 + 295,424; block2 918,272 + 1,180,672;
# block3 3,671,552 + 4,720,640; final BN 1,024; fc 5,130. The CRD (Tian et al. 2020) KD pairs at
# 100 classes are 0.70M / 0.57M / 2.26M for WRN-16-2 / 40-1 / 40-2; at 10 classes:
PARAMS = {
    "wrn16_8": 10_961_370,
    "wrn28_10": 36_479_194,
    "wrn16_2": 691_674,
    "wrn40_1": 563_930,
    "wrn40_2": 2_243_546,
}


@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_contract_and_stage_shapes(run_contract, in_chans, size):
    _, inter = run_contract("wrn16_2", in_chans, size)
    assert [tuple(t.shape[1:]) for t in inter] == [
        (32, size, size), (64, size // 2, size // 2), (128, size // 4, size // 4)]


@pytest.mark.parametrize("name", ["wrn16_8", "wrn40_1", "wrn40_2"])
def test_contract_registered(run_contract, name):
    run_contract(name, 1, 28)


@pytest.mark.slow
def test_contract_wrn28_10(run_contract):
    run_contract("wrn28_10", 3, 32)


def test_contract_with_dropout(run_contract):
    model, _ = run_contract("wrn16_2", 3, 32, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 6


@pytest.mark.parametrize("name,params", sorted(PARAMS.items()))
def test_param_counts(name, params):
    assert count_params(create_model(name)) == params


def test_generic_builder():
    model = wrn(10, 1, num_classes=5, in_chans=1)
    assert isinstance(model, WideResNet) and (model.depth, model.widen_factor) == (10, 1)
    assert count_params(model) == count_params(WideResNet(10, 1, num_classes=5, in_chans=1))
    with pytest.raises(ValueError):
        wrn(15, 2)
