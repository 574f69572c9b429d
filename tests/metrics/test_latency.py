import pytest
import torch
from torch import nn

from kdprune.metrics import compare_latency, measure_latency

KEYS = {"median_ms", "p10_ms", "p90_ms", "images_per_s"}


def _tiny(width):
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _models():
    torch.manual_seed(0)
    models = {"big": _tiny(4), "small": _tiny(2)}
    for m in models.values():
        m(torch.zeros(1, 1, 8, 8))  # materialise the lazy layer
    return models


def test_measure_latency_keys_and_restore():
    model = _models()["big"]
    model.train()
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1  # differs from the current count so restoring is observable
    res = measure_latency(model, (1, 8, 8), batch_sizes=(1, 4), threads=other, warmup=1, repeats=3)
    assert set(res) == {1, 4}
    for stats in res.values():
        assert set(stats) == KEYS
        assert stats["median_ms"] > 0 and stats["images_per_s"] > 0
        assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert torch.get_num_threads() == before
    assert model.training


def test_compare_latency_interleaved():
    before = torch.get_num_threads()
    res = compare_latency(_models(), (1, 8, 8), batch_sizes=(2,), threads=1, warmup=1, rounds=3)
    assert list(res) == ["big", "small"]
    for per_bs in res.values():
        assert set(per_bs) == {2}
        assert set(per_bs[2]) == KEYS | {"speedup"}
        assert per_bs[2]["median_ms"] > 0 and per_bs[2]["speedup"] > 0
    assert res["big"][2]["speedup"] == 1.0
    assert torch.get_num_threads() == before


def test_bad_repeats():
    with pytest.raises(ValueError):
        measure_latency(nn.Linear(2, 2), (2,), repeats=0)
