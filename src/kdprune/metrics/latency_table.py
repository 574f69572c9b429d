"""Per-layer latency table: the measured time of each layer of a model at its actual input shape,
on one backend, batch size and thread count, cached so that a layer shape is timed once per machine.

An entry's key is the layer's type, its shape hyperparameters (``extra_repr``: channels, kernel,
stride, groups, bias...) and its input shape at the table's batch; the table itself is bound to a
context (backend, batch, threads, torch version, CPU model), and each context has its own JSON file
under ``$KDPRUNE_CACHE`` (default ``~/.cache/kdprune``)/``latency/``. Missing entries are timed
together with a fixed unit layer, round-robin (so a noisy burst hits them alike); each entry is
its median over the unit's, so entries timed at different moments of a loaded machine compare.
``LatencyModel`` predicts a model's latency as the sum of its layers' entries plus a fixed
overhead (what the layers do not account for: functional ops, Python, the runtime's own cost)
fitted once from the dense model's whole forward, timed with the unit layer too.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from kdprune.metrics.backends import Backend, bind_backend
from kdprune.metrics.latency import _threads, compare_backends
from kdprune.registry import check_choice

__all__ = ["CACHE_ENV", "UNIT_NAME", "LayerCall", "LatencyTable", "LatencyModel", "cache_dir", "cpu_model",
           "layer_calls", "layer_key", "measure_end_to_end", "shared_table", "time_layers", "unit_call"]

CACHE_ENV = "KDPRUNE_CACHE"
#: Shortest timed sample: a layer this fast is called several times per sample (timer resolution).
MIN_SAMPLE_S = 2e-4


def cache_dir() -> Path:
    """Where kdprune caches measurements: ``$KDPRUNE_CACHE`` or ``~/.cache/kdprune``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdprune"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


@dataclass(frozen=True)
class LayerCall:
    """One call of a timed layer inside a model's forward: its key, and its input at the table's batch."""

    name: str
    key: str
    input_shape: tuple[int, ...]
    module: nn.Module = field(compare=False, repr=False)


def layer_key(module: nn.Module, input_shape: Sequence[int]) -> str:
    """Type, shape hyperparameters and input shape of a layer: what its latency depends on."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}({module.extra_repr()})@{'x'.join(str(int(d)) for d in input_shape)}"


def _timed(module: nn.Module) -> bool:
    # torch.nn's own leaf layers: their extra_repr names every hyperparameter their cost depends
    # on; a user's leaf module may hide state, so it stays in the fixed overhead.
    return (next(module.children(), None) is None and type(module).__module__.startswith("torch.nn.modules")
            and not parametrize.is_parametrized(module))


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def layer_calls(model: nn.Module, example_input: torch.Tensor, batch: int) -> list[LayerCall]:
    """Every call of a timed layer (a torch.nn leaf with one tensor input) in one eval forward of
    ``example_input``, its input's batch axis scaled to ``batch``."""
    b0 = max(1, int(example_input.shape[0]))
    calls: list[LayerCall] = []

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def grab(mod: nn.Module, args: tuple) -> None:
            if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
                s = tuple(args[0].shape)
                shape = (s[0] * batch // b0, *s[1:]) if s[0] % b0 == 0 else s
                calls.append(LayerCall(name, layer_key(mod, shape), shape, mod))
        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if _timed(m)]
    try:
        with _eval(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return calls


def _bound(call: LayerCall, backend: Backend, threads: int) -> Callable[[], Any]:
    module = copy.deepcopy(call.module).eval()
    module._forward_pre_hooks.clear()  # the table times the layer itself, not what hooks add
    module._forward_hooks.clear()
    x = torch.randn(call.input_shape, generator=torch.Generator().manual_seed(0))
    try:
        return bind_backend(module, backend, tuple(call.input_shape[1:]), threads)(x)
    except Exception as e:  # noqa: BLE001 - name the layer, whatever the backend raised
        raise ValueError(f"cannot time {call.name} ({call.key}) on {backend.value}: {e}") from e


def _repeats(fn: Callable[[], Any], warmup: int) -> int:
    """Calls per timed sample so that one sample lasts at least MIN_SAMPLE_S."""
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    per = (time.perf_counter() - t0) / max(1, warmup)
    return max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(per, 1e-9))))


def time_layers(calls: Sequence[LayerCall], backend: Backend, threads: int, rounds: int = 15,
                warmup: int = 3) -> list[float]:
    """Median ms per call of each layer, timed round-robin (the starting layer rotated each round)."""
    if not calls:
        return []
    with _threads(threads):
        fns = [_bound(c, backend, threads) for c in calls]  # outside inference mode: tracing needs autograd
        with torch.inference_mode():
            reps = [_repeats(f, warmup) for f in fns]
            samples: list[list[float]] = [[] for _ in fns]
            for r in range(rounds):
                for j in range(len(fns)):
                    i = (r + j) % len(fns)
                    # In a forward a layer reads what the layer before it just wrote: one untimed
                    # call brings its input, weights and output buffer back into cache likewise.
                    fns[i]()
                    t0 = time.perf_counter()
                    for _ in range(reps[i]):
                        fns[i]()
                    samples[i].append((time.perf_counter() - t0) * 1000.0 / reps[i])
    return [sorted(s)[len(s) // 2] for s in samples]


UNIT_NAME = "<unit>"


def unit_call(batch: int) -> LayerCall:
    """The unit of a table's entries: a fixed 16-channel 3x3 conv on 16x16 maps at ``batch``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).eval()
    shape = (int(batch), 16, 16, 16)
    return LayerCall(UNIT_NAME, layer_key(conv, shape), shape, conv)


class LatencyTable:
    """Layer key -> latency for one context (backend, batch, threads, torch, CPU), in memory and on
    disk; ``measured`` counts the entries this table timed (cache misses).

    Entries are in *units*: a layer's median over the median of ``unit_call`` timed in the same
    interleaved batch. A loaded machine runs at a varying speed, so milliseconds timed minutes (or
    runs) apart do not compare; ratios to a layer timed alongside do."""

    def __init__(self, backend: Backend = Backend.EAGER, batch: int = 1, threads: int | None = None,
                 persist: bool = True, rounds: int = 15, warmup: int = 3) -> None:
        check_choice(backend, Backend, "backend")
        if batch < 1:
            raise ValueError(f"latency batch must be >= 1, got {batch}")
        self.backend, self.batch, self.rounds, self.warmup = backend, int(batch), rounds, warmup
        self.threads = int(threads if threads is not None else torch.get_num_threads())
        self.unit = unit_call(self.batch)
        self.context = {"backend": backend.value, "batch": self.batch, "threads": self.threads,
                        "torch": torch.__version__, "cpu": cpu_model(), "unit": self.unit.key}
        digest = hashlib.sha256(json.dumps(self.context, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir() / "latency" / f"{digest}.json" if persist else None
        self.entries: dict[str, float] = self._read()
        self.measured = 0

    def _read(self) -> dict[str, float]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a torn or foreign file: measure again rather than fail
        if data.get("context") != self.context:
            return {}
        return {str(k): float(v) for k, v in data.get("entries", {}).items()}

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(), **self.entries}  # another process may have added entries meanwhile
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"context": self.context, "entries": merged}, indent=0, sort_keys=True))
        os.replace(tmp, self.path)  # atomic: a reader sees the old or the new file, never half of one

    def _time(self, calls: Sequence[LayerCall]) -> list[float]:
        """Each call in units: timed interleaved with the unit layer, its median over the unit's."""
        ms = time_layers([self.unit, *calls], self.backend, self.threads, self.rounds, self.warmup)
        return [m / ms[0] for m in ms[1:]]

    def calls(self, model: nn.Module, example_input: torch.Tensor) -> list[LayerCall]:
        """The timed layer calls of ``model`` (see ``layer_calls``) at this table's batch."""
        return layer_calls(model, example_input, self.batch)

    def lookup(self, calls: Sequence[LayerCall]) -> list[float]:
        """Units of each call; entries not in the table are timed now, together, and cached."""
        missing: dict[str, LayerCall] = {}
        for c in calls:
            if c.key not in self.entries and c.key not in missing:
                missing[c.key] = c
        if missing:
            todo = list(missing.values())
            for c, units in zip(todo, self._time(todo)):
                self.entries[c.key] = float(units)
            self.measured += len(todo)
            self._write()
        return [self.entries[c.key] for c in calls]

    def layer_sum(self, model: nn.Module, example_input: torch.Tensor) -> float:
        """Sum of the table's entries over every timed layer call of ``model``, in units."""
        return float(sum(self.lookup(self.calls(model, example_input))))

    def time_models(self, models: Mapping[str, nn.Module], example_input: torch.Tensor) -> dict[str, float]:
        """Whole forwards at this table's batch, in units (timed now, never cached)."""
        shape = (self.batch, *example_input.shape[1:])
        calls = [LayerCall(name, f"model:{name}", shape, m) for name, m in models.items()]
        return dict(zip(models, self._time(calls)))

    def __len__(self) -> int:
        return len(self.entries)


_SHARED: dict[tuple, LatencyTable] = {}


def shared_table(backend: Backend = Backend.EAGER, batch: int = 1, threads: int | None = None) -> LatencyTable:
    """The process-wide table of one context (and cache directory): every search shares its entries."""
    n = int(threads if threads is not None else torch.get_num_threads())
    key = (backend, int(batch), n, str(cache_dir()))
    if key not in _SHARED:
        _SHARED[key] = LatencyTable(backend, batch, n)
    return _SHARED[key]


def measure_end_to_end(models: Mapping[str, nn.Module], example_input: torch.Tensor, backend: Backend,
                       batch: int, threads: int, rounds: int = 20) -> dict[str, float]:
    """Median ms of each model's forward at ``batch`` on ``backend``, the models timed interleaved."""
    res = compare_backends(models, tuple(example_input.shape[1:]), [backend], batch_sizes=(batch,),
                           threads=threads, rounds=rounds)
    return {n: float(res[n][backend.value][batch]["median_ms"]) for n in models}


class LatencyModel:
    """Predicted latency of edited copies of ``dense``, in table units: the sum of their layers'
    entries plus the overhead fitted on ``dense`` (its whole forward, timed with the unit layer,
    minus its layer sum); ``measure`` times a model against ``dense`` end to end, in ms."""

    def __init__(self, dense: nn.Module, example_input: torch.Tensor, table: LatencyTable,
                 rounds: int = 20) -> None:
        self.dense, self.x, self.table, self.rounds = dense, example_input, table, rounds
        self._start = table.measured
        self.dense_units = table.time_models({"dense": dense}, example_input)["dense"]
        self.dense_layers = table.layer_sum(dense, example_input)
        self.overhead = self.dense_units - self.dense_layers

    def predict(self, model: nn.Module) -> float:
        """Predicted latency of ``model`` (an edited copy of the dense model), in table units."""
        return self.table.layer_sum(model, self.x) + self.overhead

    def measure(self, model: nn.Module) -> tuple[float, float]:
        """(dense ms, ``model`` ms) measured end to end at the table's batch, interleaved."""
        t = self.table
        res = measure_end_to_end({"dense": self.dense, "model": model}, self.x, t.backend, t.batch, t.threads,
                                 self.rounds)
        return res["dense"], res["model"]

    @property
    def entries_measured(self) -> int:
        """Table entries timed since this model was built (the others came from the cache)."""
        return self.table.measured - self._start
