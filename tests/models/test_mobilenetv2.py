"""CIFAR MobileNetV2 (Sandler et al. 2018) with kuangliu/pytorch-cifar strides."""
from __future__ import annotations

import pytest
from torch import nn

from kdprune.metrics import count_params
from kdprune.models import InvertedResidual, create_model
from kdprune.models.mobilenetv2 import make_divisible


@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_contract_and_stage_shapes(run_contract, in_chans, size):
    _, inter = run_contract("mobilenetv2", in_chans, size)
    s = [size, size, size // 2, size // 4, size // 4, -(-size // 8), -(-size // 8)]
    chans = [16, 24, 32, 64, 96, 160, 320]
    assert [tuple(t.shape[1:]) for t in inter] == [(c, k, k) for c, k in zip(chans, s)]


def test_contract_width_mult_and_dropout(run_contract):
    model, inter = run_contract("mobilenetv2", 3, 32, width_mult=0.5, drop_rate=0.2)
    assert [t.shape[1] for t in inter] == [8, 16, 16, 32, 48, 80, 160]
    assert model.classifier.in_features == 1280  # last conv never shrinks below 1280


def test_param_count():
    # torchvision mobilenet_v2 has 3,504,872 params (its docs); minus its Linear(1280, 1000)
    # (1,281,000) plus Linear(1280, 10) (12,810) = 2,236,682: strides do not change params.
    assert count_params(create_model("mobilenetv2")) == 3_504_872 - 1_281_000 + 12_810


def test_blocks_are_inverted_residuals_with_depthwise_convs():
    model = create_model("mobilenetv2")
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_res for b in blocks) == 10
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 17 and all(m.groups == m.in_channels == m.out_channels for m in dw)


def test_make_divisible():
    assert [make_divisible(v) for v in (32, 16 * 0.5, 24 * 0.75, 1280 * 1.4)] == [32, 8, 24, 1792]
