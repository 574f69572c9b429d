"""Training compute, counted, not timed (issue 36): the FLOPs of every forward and backward a
training step runs (the trained model, its teachers, replicas, assistants, masked full-width
passes: whatever the task computes), counted from the ops' shapes by torch's ``FlopCounterMode``
(convolutions, matrix products; elementwise ops are not counted) on the first step of each epoch
and scaled by the images the epoch saw. Every epoch row of a training history carries its
``train_flops``; a compression run sums them over its stages, plus the forward passes of its
BatchNorm re-estimations, with ``tally()``. Evaluation passes are not training compute.

Exact when every step of an epoch costs the same per image (a cut between epochs is; a cut inside
an epoch is counted at the epoch's first step's width, so an upper bound)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, TypeVar

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Tally", "tally", "add", "counted", "history_flops"]

T = TypeVar("T")


class Tally:
    """FLOPs added while it is open (``tally()``), by ``train`` and by counted forward passes."""

    def __init__(self) -> None:
        self.total = 0.0


_OPEN: list[Tally] = []


@contextlib.contextmanager
def tally() -> Iterator[Tally]:
    """Sum the training compute run inside the block (nested tallies each see it)."""
    t = Tally()
    _OPEN.append(t)
    try:
        yield t
    finally:
        _OPEN.remove(t)


def add(flops: float) -> None:
    """Add ``flops`` to every open tally."""
    for t in _OPEN:
        t.total += float(flops)


def counted(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``fn(*args, **kwargs)`` and the FLOPs its ops ran (forward and any backward inside)."""
    mode = FlopCounterMode(display=False)
    with mode:
        out = fn(*args, **kwargs)
    return out, float(mode.get_total_flops())


def history_flops(history: list[dict[str, Any]]) -> float:
    """The training FLOPs of a history (its epoch rows' ``train_flops``)."""
    return float(sum(row.get("train_flops", 0.0) for row in history))
