"""CIFAR VGG-16-BN (Simonyan & Zisserman 2015; network-slimming / kuangliu classifier)."""
from __future__ import annotations

import pytest
from torch import nn

from kdprune.metrics import complexity, count_params
from kdprune.models import create_model


@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_contract_and_stage_shapes(run_contract, in_chans, size):
    _, inter = run_contract("vgg16_bn", in_chans, size)
    spatial = [16, 8, 4, 2, 1] if size == 32 else [14, 7, 4, 2, 1]  # ceil_mode pools at 28x28
    assert [tuple(t.shape[1:]) for t in inter] == [
        (c, s, s) for c, s in zip([64, 128, 256, 512, 512], spatial)]


def test_param_count():
    # 13 bias-free 3x3 convs 14,710,464 + 13 BN (2 * 4,224 channels) 8,448 + Linear(512,10) 5,130.
    # kuangliu/pytorch-cifar's VGG16 (same layers, convs *with* bias) has 14,728,266 = +4,224.
    model = create_model("vgg16_bn")
    assert count_params(model) == 14_724_042
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert model.classifier.in_features == 512


def test_macs_match_pfec():
    # Li et al. 2017 (PFEC) Table 2: VGG-16 on CIFAR-10 has 3.13e8 FLOPs (= MACs) in conv/linear.
    macs = complexity(create_model("vgg16_bn"), input_size=(1, 3, 32, 32)).macs
    assert abs(macs - 3.13e8) / 3.13e8 < 0.01


def test_feature_modules_are_stages():
    model = create_model("vgg16_bn")
    assert model.feature_modules == [f"features.{i}" for i in range(5)]
    assert model.classifier_name == "classifier"
