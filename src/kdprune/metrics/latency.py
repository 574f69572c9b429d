"""Forward-pass latency: single-model sweeps and interleaved multi-model comparisons."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn


def _percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of an already sorted list."""
    if not sorted_vals:
        raise ValueError("no samples")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summarise(times_s: Sequence[float], batch_size: int) -> dict[str, float]:
    """Median / p10 / p90 in ms and throughput (from the median) for one batch size."""
    ms = sorted(t * 1000.0 for t in times_s)
    median = _percentile(ms, 50)
    return {
        "median_ms": median,
        "p10_ms": _percentile(ms, 10),
        "p90_ms": _percentile(ms, 90),
        "images_per_s": batch_size * 1000.0 / median if median > 0 else float("inf"),
    }


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without a sync the timer measures only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None leaves it alone)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _prepared(models: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Models in eval mode on `device`; training flags and original devices restored afterwards."""
    states = []
    for m in models:
        p = next(m.parameters(), None)
        states.append((m.training, p.device if p is not None else None))
        m.eval().to(device)
    try:
        yield
    finally:
        for m, (training, dev) in zip(models, states):
            m.train(training)
            if dev is not None:
                m.to(dev)


def _time_once(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Seconds for one synchronised forward pass."""
    _sync(device)
    t0 = time.perf_counter()
    model(x)
    _sync(device)
    return time.perf_counter() - t0


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    device: torch.device | str = "cpu",
) -> dict[int, dict[str, float]]:
    """Per batch size: median/p10/p90 ms and images/s; input_size excludes the batch dim."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    dev = torch.device(device)
    results: dict[int, dict[str, float]] = {}
    with _threads(threads), _prepared([model], dev), torch.inference_mode():
        for bs in batch_sizes:
            x = torch.randn(bs, *input_size, device=dev)
            for _ in range(warmup):  # allocator, caches, cuDNN/oneDNN algorithm selection
                model(x)
            times = [_time_once(model, x, dev) for _ in range(repeats)]
            results[int(bs)] = _summarise(times, bs)
    return results


def compare_latency(
    models: Mapping[str, nn.Module],
    input_size: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    warmup: int = 5,
    rounds: int = 20,
    device: torch.device | str = "cpu",
) -> dict[str, dict[int, dict[str, float]]]:
    """Round-robin timing of several models; adds "speedup" = first model's median / this median."""
    if not models:
        return {}
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    dev = torch.device(device)
    names = list(models)
    times: dict[str, dict[int, list[float]]] = {n: {int(b): [] for b in batch_sizes} for n in names}
    with _threads(threads), _prepared(list(models.values()), dev), torch.inference_mode():
        for bs in batch_sizes:
            x = torch.randn(bs, *input_size, device=dev)
            for name in names:
                for _ in range(warmup):
                    models[name](x)
            for r in range(rounds):
                # Interleave so a noisy burst hits every model alike, and rotate the
                # starting model so none is always timed right after the same neighbour.
                for i in range(len(names)):
                    name = names[(r + i) % len(names)]
                    times[name][int(bs)].append(_time_once(models[name], x, dev))
    out = {n: {b: _summarise(ts, b) for b, ts in per_bs.items()} for n, per_bs in times.items()}
    base = out[names[0]]
    for per_bs in out.values():
        for b, stats in per_bs.items():
            med = stats["median_ms"]
            stats["speedup"] = base[b]["median_ms"] / med if med > 0 else float("inf")
    return out
