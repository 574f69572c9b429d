"""The per-layer latency table: keys, in-memory and on-disk caching (a second lookup times
nothing), contexts kept apart, and LatencyModel's prediction = sum of the entries + the overhead
fitted on the dense model. Timing is faked (no assertion on a measured speed)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdprune.engine import PruningPlan, apply_plan
from kdprune.metrics import Backend, LatencyModel, LatencyTable, layer_calls, shared_table
from kdprune.metrics import latency_table as lt
from tests.engine.fake_latency import FakeLatency
from tests.engine.tiny_models import WideNet

X = torch.zeros(1, 3, 8, 8)


class SharedRelu(nn.Module):
    """One ReLU module called twice, a functional op (not timed) and a custom leaf (overhead)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(torch.sigmoid(x).mean((2, 3)))


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeLatency:
    return FakeLatency().install(monkeypatch, tmp_path / "cache")


def test_layer_calls_keys_every_call_at_the_table_batch():
    calls = layer_calls(SharedRelu(), X, batch=16)
    assert [c.name for c in calls] == ["conv1", "relu", "conv2", "relu", "fc"]  # the shared ReLU twice
    assert calls[0].input_shape == (16, 3, 8, 8) and calls[-1].input_shape == (16, 8)
    conv = "torch.nn.modules.conv.Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"
    assert calls[0].key == f"{conv}@16x3x8x8"
    assert calls[1].key == calls[3].key  # equal shapes share one entry
    assert not any(m._forward_pre_hooks for m in SharedRelu().modules())


def test_second_lookup_times_nothing_and_the_disk_cache_reloads(fake, tmp_path):
    table = LatencyTable(Backend.EAGER, batch=4)
    model = WideNet(width=16, depth=3)
    first = table.layer_sum(model, X)
    assert fake.layers_timed == table.measured == len(table) > 0
    assert table.layer_sum(model, X) == first and fake.layers_timed == table.measured  # memory hit
    again = LatencyTable(Backend.EAGER, batch=4)  # a new process: entries come from the JSON file
    assert len(again) == len(table) and again.layer_sum(model, X) == first
    assert again.measured == 0 and fake.layers_timed == table.measured
    assert table.path is not None and table.path.parent == tmp_path / "cache" / "latency"
    other = LatencyTable(Backend.EAGER, batch=8)  # another context: its own file, measured anew
    assert other.path != table.path and len(other) == 0


def test_entries_match_the_timer_and_a_torn_file_is_measured_again(fake):
    table = LatencyTable(Backend.EAGER, batch=2)
    model = SharedRelu()
    calls = table.calls(model, X)
    unit = fake.unit_ms(2)
    assert table.lookup(calls) == [pytest.approx(fake.layer_ms(c.module, c.input_shape) / unit) for c in calls]
    table.path.write_text("{not json")
    fresh = LatencyTable(Backend.EAGER, batch=2)
    assert len(fresh) == 0 and fresh.layer_sum(model, X) == pytest.approx(sum(table.lookup(calls)))


def test_shared_table_is_one_per_context_and_cache_dir(fake, monkeypatch, tmp_path):
    a = shared_table(Backend.EAGER, 1)
    assert shared_table(Backend.EAGER, 1) is a and shared_table(Backend.EAGER, 64) is not a
    monkeypatch.setenv(lt.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert shared_table(Backend.EAGER, 1) is not a


def test_prediction_is_the_sum_of_entries_plus_the_dense_overhead(monkeypatch, tmp_path):
    fake = FakeLatency(scale=1.3, overhead=0.7).install(monkeypatch, tmp_path)
    torch.manual_seed(0)
    dense = WideNet(width=16, depth=3)
    table = LatencyTable(Backend.EAGER, batch=1)
    model = LatencyModel(dense, X, table)
    unit = fake.unit_ms(1)  # entries and the dense forward are in units of the unit layer
    assert model.dense_units == pytest.approx(fake.model_ms(dense, X, 1) / unit)
    assert model.overhead == pytest.approx(model.dense_units - table.layer_sum(dense, X))
    assert model.predict(dense) == pytest.approx(model.dense_units)
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, X, PruningPlan({"features.0.0": tuple(range(6))}))
    entries = table.lookup(table.calls(pruned, X))
    assert model.predict(pruned) == pytest.approx(sum(entries) + model.overhead)
    assert entries == [pytest.approx(fake.layer_ms(c.module, c.input_shape) / unit) for c in table.calls(pruned, X)]
    d, p = model.measure(pruned)
    assert (d, p) == (pytest.approx(fake.model_ms(dense, X, 1)), pytest.approx(fake.model_ms(pruned, X, 1)))
    assert model.entries_measured == table.measured


def test_the_real_timer_returns_one_median_per_layer(monkeypatch, tmp_path):
    monkeypatch.setenv(lt.CACHE_ENV, str(tmp_path))
    calls = layer_calls(SharedRelu(), X, batch=1)
    ms = lt.time_layers(calls[:3], Backend.EAGER, threads=1, rounds=3, warmup=1)
    assert len(ms) == 3 and all(v > 0 for v in ms)  # no assertion on the values: timing is noisy
    table = LatencyTable(Backend.EAGER, batch=1, rounds=3, warmup=1)
    units = table.time_models({"net": SharedRelu()}, X)
    assert set(units) == {"net"} and units["net"] > 0 and len(table) == 0  # whole forwards are not cached
