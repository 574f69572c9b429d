"""Forward-pass latency: single-model sweeps, interleaved multi-model comparisons, and the same on
several backends (eager, channels-last, TorchScript, ONNX Runtime; see ``backends``)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdprune.metrics.backends import Backend, bind_backend


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


def _interleave(binders: Mapping[Any, Callable[[torch.Tensor], Callable[[], Any]]], input_size: Sequence[int],
                batch_sizes: Sequence[int], warmup: int, rounds: int, device: torch.device
                ) -> dict[Any, dict[int, list[float]]]:
    """Seconds per call of every binder's bound call, per batch size, timed round-robin."""
    keys = list(binders)
    times: dict[Any, dict[int, list[float]]] = {k: {int(b): [] for b in batch_sizes} for k in keys}
    for bs in batch_sizes:
        x = torch.randn(bs, *input_size, device=device)
        calls = {k: binders[k](x) for k in keys}
        for k in keys:
            for _ in range(warmup):  # allocator, caches, oneDNN/ORT kernel selection
                calls[k]()
        for r in range(rounds):
            # Interleave so a noisy burst hits every model alike, and rotate the
            # starting model so none is always timed right after the same neighbour.
            for i in range(len(keys)):
                k = keys[(r + i) % len(keys)]
                _sync(device)
                t0 = time.perf_counter()
                calls[k]()
                _sync(device)
                times[k][int(bs)].append(time.perf_counter() - t0)
    return times


def _speedups(out: Mapping[Any, dict[int, dict[str, float]]], base: dict[int, dict[str, float]], key: str) -> None:
    for per_bs in out.values():
        for b, stats in per_bs.items():
            med = stats["median_ms"]
            stats[key] = base[b]["median_ms"] / med if med > 0 else float("inf")


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
    binders = {n: (lambda m: lambda x: (lambda: m(x)))(m) for n, m in models.items()}
    with _threads(threads), _prepared(list(models.values()), dev), torch.inference_mode():
        times = _interleave(binders, input_size, batch_sizes, warmup, rounds, dev)
    out = {n: {b: _summarise(ts, b) for b, ts in per_bs.items()} for n, per_bs in times.items()}
    _speedups(out, out[next(iter(models))], "speedup")
    return out


def compare_backends(
    models: Mapping[str, nn.Module],
    input_size: Sequence[int],
    backends: Sequence[Backend] = (Backend.EAGER,),
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    warmup: int = 5,
    rounds: int = 20,
) -> dict[str, dict[str, dict[int, dict[str, float]]]]:
    """Interleaved CPU timing of every (model, backend): model -> backend value -> batch -> stats.

    Stats add "speedup" (the first model on the same backend / this), "vs_first_backend" (this
    model on the first backend / this) and "threads" (torch's and ONNX Runtime's intra-op threads)."""
    if not models or not backends:
        return {}
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    cpu = torch.device("cpu")
    with _threads(threads), _prepared(list(models.values()), cpu):
        n_threads = torch.get_num_threads()
        # bound before timing and outside inference mode, which tracing and the ONNX export cannot run under
        binders = {(n, b): bind_backend(m, b, tuple(input_size), n_threads)
                   for n, m in models.items() for b in backends}
        with torch.inference_mode():
            times = _interleave(binders, input_size, batch_sizes, warmup, rounds, cpu)
    out: dict[str, dict[str, dict[int, dict[str, float]]]] = {n: {} for n in models}
    for (n, b), per_bs in times.items():
        out[n][b.value] = {bs: {**_summarise(ts, bs), "threads": n_threads} for bs, ts in per_bs.items()}
    first_model, first_backend = next(iter(models)), backends[0].value
    for b in backends:
        _speedups({n: out[n][b.value] for n in models}, out[first_model][b.value], "speedup")
    for n in models:
        _speedups(out[n], out[n][first_backend], "vs_first_backend")
    return out
