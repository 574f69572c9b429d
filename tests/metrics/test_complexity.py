import torch
from torch import nn

from kdprune.metrics import (
    complexity,
    count_params,
    format_markdown,
    format_table,
    layer_table,
    layer_widths,
)


def test_conv_flops_hand_computed():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    c = complexity(conv, input_size=(1, 3, 8, 8))
    assert c.macs == 8 * 3 * 9 * 64
    assert c.flops == 2 * 8 * 3 * 9 * 64
    assert c.params == 8 * 3 * 9 + 8
    assert c.as_dict() == {"params": c.params, "flops": c.flops, "macs": c.macs}


def test_linear_flops():
    c = complexity(nn.Linear(16, 4), input_size=(1, 16))
    assert c.macs == 16 * 4
    assert c.params == 16 * 4 + 4


def test_grouped_and_depthwise_conv():
    grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
    assert complexity(grouped, input_size=(1, 8, 6, 6)).macs == 12 * 9 * (8 // 4) * 36
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert complexity(depthwise, input_size=(1, 8, 6, 6)).macs == 8 * 9 * 1 * 36


def _small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_sequential_total_is_sum_and_table_matches():
    net = _small_net()
    total = complexity(net, input_size=(1, 3, 8, 8))
    expected_macs = 8 * 3 * 9 * 64 + 8 * 9 * 64 + 8 * 5
    assert total.macs == expected_macs
    assert total.params == count_params(net)

    rows = layer_table(net, input_size=(1, 3, 8, 8))
    assert [r["name"] for r in rows] == ["0", "1", "3", "6"]
    assert sum(r["flops"] for r in rows) == total.flops
    assert sum(r["params"] for r in rows) == total.params
    conv0, bn, dw, fc = rows
    assert (conv0["type"], conv0["in"], conv0["out"], conv0["kernel"], conv0["groups"]) == (
        "Conv2d", 3, 8, "3x3", 1)
    assert dw["groups"] == 8 and dw["macs"] == 8 * 9 * 64
    assert (bn["in"], bn["out"], bn["flops"]) == (8, 8, 0)
    assert (fc["type"], fc["in"], fc["out"]) == ("Linear", 8, 5)
    assert net.training  # mode restored


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.stem(x).mean(dim=(2, 3)))


def test_layer_table_nested_names_and_widths():
    net = _Nested()
    rows = layer_table(net, example_input=torch.zeros(1, 1, 6, 6))
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"stem.0", "head"}
    assert by_name["stem.0"]["macs"] == 4 * 1 * 9 * 16
    assert by_name["head"]["macs"] == 4 * 3
    assert layer_widths(net) == {"stem.0": 4, "head": 3}
    assert layer_widths(_small_net()) == {"0": 8, "3": 8, "6": 5}


def test_format_table_and_markdown():
    rows = [
        {"name": "conv", "params": 1234, "ratio": 0.5},
        {"name": "fc", "params": 7, "ratio": None},
    ]
    text = format_table(rows, ["name", "params", "ratio"])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "params", "ratio"]
    assert "1,234" in lines[2] and "0.50" in lines[2]
    assert lines[3].split() == ["fc", "7", "-"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned
    md = format_markdown(rows, {"name": "Layer", "params": "Params"})
    assert md.splitlines() == ["| Layer | Params |", "|---|---:|", "| conv | 1,234 |", "| fc | 7 |"]
    assert format_table([], ["a"]).splitlines()[0] == "a"
