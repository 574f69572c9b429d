"""BatchNorm re-estimation after a physical edit: the running statistics of every BatchNorm whose
input the edit changed are set to the exact mean and (unbiased) variance of that input over N
training batches, reduced across torchrun ranks. A BatchNorm whose input is unchanged keeps its
statistics (a pruned BN keeps its surviving channels' statistics, sliced by the edit)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from kdprune.data import as_loader
from kdprune.utils.dist import all_reduce_sum

__all__ = ["Recalibrate", "RecalibrationReport", "affected_norms", "batch_norms", "recalibrate_norms"]

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Recalibrate:
    """How to re-estimate BatchNorm statistics: ``batches`` unaugmented, shuffled training batches
    of ``batch_size`` images (0 batches: off), the order fixed by ``seed``."""

    batches: int = 30
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batches < 0 or self.batch_size < 1:
            raise ValueError(f"Recalibrate needs batches >= 0 and batch_size >= 1, got {self.batches}, "
                             f"{self.batch_size}")


@dataclass(frozen=True)
class RecalibrationReport:
    """What one re-estimation did: which BatchNorms it re-estimated, on how many images."""

    norms: tuple[str, ...]
    kept: tuple[str, ...]  # BatchNorms whose input the edit left unchanged
    batches: int
    images: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"recalibrated": len(self.norms), "unchanged": len(self.kept), "batches": self.batches,
                "images": self.images}


def batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every BatchNorm of ``model`` that tracks running statistics."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BN) and m.running_mean is not None}


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    """[C, rest] view of a BatchNorm input [N, C, *spatial] (or [N, C])."""
    return t.detach().double().transpose(0, 1).reshape(t.shape[1], -1)


def _inputs(model: nn.Module, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The input of each named BatchNorm in one eval-mode, no-grad forward of ``x``."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_m: nn.Module, args: tuple) -> None:  # returns None: the input is not replaced
            seen.setdefault(name, _channels_first(args[0]))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def _matched(after: torch.Tensor, before: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether every channel of ``after`` equals some channel of ``before`` (same batch, [C, rest])."""
    if after.shape[1] != before.shape[1]:
        return False
    scale = float(before.abs().max().clamp_min(1e-12))
    dist = torch.cdist(after, before)  # a channel's values over the batch are its fingerprint
    return bool((dist.min(dim=1).values <= rtol * scale * after.shape[1] ** 0.5).all())


def affected_norms(before: nn.Module, after: nn.Module, x: torch.Tensor) -> list[str]:
    """BatchNorms of ``after`` whose input on ``x`` is no channel subset of the same-named
    BatchNorm's input in ``before`` (new ones included): the ones an edit made stale."""
    names, had = batch_norms(after), batch_norms(before)
    old = _inputs(before, x.to(_device(before)), [n for n in names if n in had])
    new = _inputs(after, x.to(_device(after)), names)
    return [n for n in names if n not in old or n not in new or not _matched(new[n], old[n])]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Moments:
    """Per-channel count, sum and sum of squares of one BatchNorm's input (float64)."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.stats = torch.zeros(3, channels, dtype=torch.float64, device=device)

    def __call__(self, _m: nn.Module, args: tuple) -> None:
        t = _channels_first(args[0])
        self.stats[0] += t.shape[1]
        self.stats[1] += t.sum(dim=1)
        self.stats[2] += (t * t).sum(dim=1)

    @torch.no_grad()
    def write(self, bn: nn.Module) -> None:
        """Set ``bn``'s running mean and unbiased variance to the pooled moments (all ranks)."""
        n, s, q = all_reduce_sum(self.stats)
        mean = s / n.clamp_min(1)
        var = (q - n * mean * mean) / (n - 1).clamp_min(1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))


def recalibrate_norms(model: nn.Module, data: Any, cfg: Recalibrate = Recalibrate(),
                      before: nn.Module | None = None) -> RecalibrationReport:
    """Re-estimate the running statistics of ``model``'s BatchNorms that an edit made stale (every
    one when ``before``, the model before the edit, is not given) on ``cfg.batches`` batches of
    ``data``: a train-mode forward of those BatchNorms only (dropout off), no gradient, the exact
    pooled mean/variance of each one's input; returns the model to eval mode."""
    norms = batch_norms(model)
    if cfg.batches == 0 or not norms:
        return RecalibrationReport((), tuple(norms), 0, 0)
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError("recalibrate_norms: the data set is empty, it yields no batch")
    loader = iter(as_loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed))
    first = next(loader)[0]
    dev = _device(model)
    stale = affected_norms(before, model, first) if before is not None else list(norms)
    moments = {n: _Moments(norms[n].num_features, dev) for n in stale}
    handles = [norms[n].register_forward_pre_hook(moments[n]) for n in stale]
    count, images = 0, 0
    model.eval()
    try:
        for n in stale:
            norms[n].train()
        with torch.no_grad():  # streamed: a batch at a time, whatever the image size
            for x in _batches(first, loader, cfg.batches):
                model(x.to(dev))
                count, images = count + 1, images + int(x.shape[0])
        for n in stale:
            moments[n].write(norms[n])
            norms[n].num_batches_tracked.fill_(count)
    finally:
        for h in handles:
            h.remove()
        model.eval()
    return RecalibrationReport(tuple(stale), tuple(n for n in norms if n not in stale), count, images)


def _batches(first: torch.Tensor, rest: Iterator, n: int) -> Iterator[torch.Tensor]:
    """``first``, then the images of the loader's next batches: ``n`` batches in all (fewer if it ends)."""
    yield first
    for _, xy in zip(range(n - 1), rest):
        yield xy[0]
