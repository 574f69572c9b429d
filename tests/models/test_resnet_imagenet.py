"""ImageNet ResNet-18/50 (He et al. 2016) with torchvision-compatible state_dicts."""
from __future__ import annotations

import pytest
import torch

from kdprune.metrics import count_params
from kdprune.models import create_model

# torchvision.models.resnet18/50 documented parameter counts (1000 classes).
PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032}
# state_dict entries: resnet18 = stem 6 (conv + 5 BN) + 8 blocks * 12 + 3 downsamples * 6 + fc 2;
# resnet50 = 6 + 16 bottlenecks * 18 + 4 downsamples * 6 + 2.
N_KEYS = {"resnet18": 122, "resnet50": 320}
TV_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.bias": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.1.num_batches_tracked": (),
        "layer4.1.bn2.weight": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.2.conv3.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.running_mean": (1024,),
        "layer4.0.downsample.1.weight": (2048,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    },
}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_matches_torchvision(name):
    model = create_model(name, num_classes=1000)
    sd = model.state_dict()
    assert len(sd) == N_KEYS[name]
    assert count_params(model) == PARAMS[name]
    for key, shape in TV_KEYS[name].items():
        assert tuple(sd[key].shape) == shape, key
    assert not [k for k in sd if "relu" in k or "avgpool" in k]


def test_resnet50_is_v1_5():
    # torchvision puts the stride on the 3x3 conv of the bottleneck ("ResNet v1.5").
    model = create_model("resnet50")
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)


def test_state_dict_round_trip_strict():
    a, b = create_model("resnet18", in_chans=1), create_model("resnet18", in_chans=1)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("in_chans,size", [(1, 32), (3, 40)])
def test_contract_resnet18(run_contract, in_chans, size):
    _, inter = run_contract("resnet18", in_chans, size)
    assert [t.shape[1] for t in inter] == [64, 128, 256, 512]
    assert inter[0].shape[-1] == size // 4 and inter[-1].shape[-1] == -(-size // 32)


def test_contract_resnet50(run_contract):
    _, inter = run_contract("resnet50", 3, 32)
    assert [t.shape[1] for t in inter] == [256, 512, 1024, 2048]


def test_zero_init_residual():
    model = create_model("resnet50", zero_init_residual=True)
    assert model.layer1[0].bn3.weight.abs().sum() == 0
    assert create_model("resnet18", zero_init_residual=True).layer1[0].bn2.weight.abs().sum() == 0
