"""Latency per backend: typed backends, interleaved results with speed-ups and threads, eval --backend."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdprune.metrics import Backend, available_backends, compare_backends

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def test_compare_backends_every_available_backend():
    models = {"wide": _net(8), "narrow": _net(4)}
    models["wide"].train()
    backends = list(available_backends())
    before = torch.get_num_threads()
    res = compare_backends(models, (1, 8, 8), backends, batch_sizes=(1, 3), threads=1, warmup=1, rounds=2)
    assert list(res) == ["wide", "narrow"] and list(res["wide"]) == [b.value for b in backends]
    for name, per_backend in res.items():
        for b, per_bs in per_backend.items():
            assert set(per_bs) == {1, 3}
            for stats in per_bs.values():
                assert stats["threads"] == 1 and stats["median_ms"] > 0 and stats["p10_ms"] <= stats["p90_ms"]
                if name == "wide":
                    assert stats["speedup"] == 1.0
                if b == "eager":
                    assert stats["vs_first_backend"] == 1.0
    assert torch.get_num_threads() == before and models["wide"].training  # state restored


def test_backends_are_typed():
    from kdprune.cli import eval_cmd

    assert eval_cmd.BACKENDS == tuple(b.value for b in Backend)  # the CLI names map onto the enum
    with pytest.raises(ValueError, match=r"pass Backend\.ONNXRUNTIME"):
        compare_backends({"m": _net(2)}, (1, 8, 8), ["onnxruntime"], rounds=1)
    assert Backend.EAGER in available_backends() and compare_backends({}, (1, 8, 8)) == {}


@pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST not installed")
def test_eval_cli_latency_per_backend(tmp_path, capsys):
    import kdprune as kp
    from kdprune.cli.main import main

    d = kp.save_pruned(kp.create_model("resnet20", num_classes=10, in_chans=1), tmp_path / "m")
    assert main(["eval", str(d), "--val-subset", "32", "--backend", "all", "--threads", "1", "--rounds", "2",
                 "--json"]) == 0
    lat = json.loads(capsys.readouterr().out)["latency"]
    assert lat["threads"] == 1 and list(lat["backends"]) == [b.value for b in available_backends()]
    assert set(lat["backends"]["eager"]) == {"1", "64"}  # JSON keys
    assert main(["eval", str(d), "--val-subset", "32", "--backend", "eager", "channels-last", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "thread(s)" in text and "channels-last" in text and "x)" in text
