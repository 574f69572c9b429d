"""A deterministic fake latency model for the latency-target tests. Timing is noisy, so tests swap
the table's layer timer and the end-to-end timer for cost formulas: a layer costs its FLOPs
(channels counted in blocks of ``block``) plus a constant, a model the sum of its layers times
``scale`` (to the ``power``) plus ``overhead`` (``scale`` and ``power`` 1: the table predicts
exactly; otherwise it is off, by a factor or nonlinearly, and the budget service has to refit)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from kdprune.metrics import latency_table as lt


def _blocks(n: int, block: int) -> int:
    return block * math.ceil(n / block)


@dataclass
class FakeLatency:
    block: int = 1  # 8: widths are timed in blocks of 8 channels, so multiples of 8 are the fast ones
    scale: float = 1.0
    overhead: float = 0.3  # ms
    power: float = 1.0  # end to end grows with layer sum ** power: != 1 makes the table's error nonlinear
    power_ref: float = 100.0  # ms where the power law meets the layer sum (about a test net's)
    layers_timed: int = 0
    e2e_calls: int = 0

    def layer_ms(self, module: nn.Module, shape: Sequence[int]) -> float:
        """FLOPs-proportional cost of one layer call plus a per-layer constant."""
        b, n = self.block, shape[0]
        if isinstance(module, nn.modules.conv._ConvNd):
            spatial = math.prod(shape[2:]) / math.prod(module.stride)
            macs = _blocks(module.in_channels, b) * _blocks(module.out_channels, b) / module.groups
            return 1e-5 * n * macs * math.prod(module.kernel_size) * spatial + 0.01
        if isinstance(module, nn.Linear):
            return 1e-5 * n * _blocks(module.in_features, b) * _blocks(module.out_features, b) + 0.01
        chans = _blocks(shape[1], b) if len(shape) > 1 else 1
        return 1e-6 * n * chans * math.prod(shape[2:]) + 0.005

    def model_ms(self, model: nn.Module, example_input: Any, batch: int) -> float:
        """What the fake end-to-end timer reports for ``model``."""
        calls = lt.layer_calls(model, example_input, batch)
        layers = sum(self.layer_ms(c.module, c.input_shape) for c in calls)
        return self.overhead + self.scale * layers ** self.power * self.power_ref ** (1 - self.power)

    def time_layers(self, calls: Sequence[lt.LayerCall], backend: Any, threads: int, rounds: int = 15,
                    warmup: int = 3) -> list[float]:
        """Layer calls (and whole models, which the table times to fit its overhead) by the formulas."""
        out = []
        for c in calls:
            if next(c.module.children(), None) is not None:  # a whole model
                x = torch.zeros(1, *c.input_shape[1:])
                out.append(self.model_ms(c.module, x, c.input_shape[0]))
            else:
                self.layers_timed += c.name != lt.UNIT_NAME
                out.append(self.layer_ms(c.module, c.input_shape))
        return out

    def unit_ms(self, batch: int) -> float:
        """What the fake times the table's unit layer at."""
        u = lt.unit_call(batch)
        return self.layer_ms(u.module, u.input_shape)

    def end_to_end(self, models: Mapping[str, nn.Module], example_input: Any, backend: Any, batch: int,
                   threads: int, rounds: int = 20) -> dict[str, float]:
        self.e2e_calls += 1
        return {n: self.model_ms(m, example_input, batch) for n, m in models.items()}

    def install(self, monkeypatch: Any, cache: Any) -> "FakeLatency":
        """Swap the timers in, and point the disk cache at ``cache`` (a fresh shared table)."""
        monkeypatch.setenv(lt.CACHE_ENV, str(cache))
        monkeypatch.setattr(lt, "time_layers", self.time_layers)
        monkeypatch.setattr(lt, "measure_end_to_end", self.end_to_end)
        return self
