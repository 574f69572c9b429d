"""Attention across channels (ECA, Wang et al. 2020: pool, a 1-D conv over the channel vector,
sigmoid, rescale), pruned exactly.

The channel vector is transposed into the length axis of a one-channel ``Conv1d`` and back. The
pair of transposes is linked channel for channel (channel c before the first is channel c after
the second), but removing channel c also removes a position the 1-D conv reads for c's
neighbours. Zeroing channel c in the dense model leaves a zero there; so the conv, once channels
are cut, becomes a ``PositionPadded`` conv (same object, same weights): it scatters its input back
to the dense length with zeros at the removed positions, convolves, and keeps the surviving
positions. The cut is then exactly the zeroed model; the conv costs the dense length, which is
the pooled vector (a few hundred multiply-adds).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["PositionPadded", "is_positional_conv", "pad_positions"]


class PositionPadded(nn.Conv1d):
    """A one-channel 1-D conv over a channel vector some of whose positions were removed: it
    convolves the dense-length vector with zeros where they were (``full_length``; the surviving
    positions in ``kept_positions``, a buffer kdprune re-creates on load, not saved)."""

    kdprune_no_fold = True  # not a weight transform (engine/fold.py leaves it alone)
    full_length: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(x.shape[0], x.shape[1], self.full_length).index_copy(2, self.kept_positions, x)
        return self._conv_forward(full, self.weight, self.bias).index_select(2, self.kept_positions)


def is_positional_conv(module: nn.Module) -> bool:
    """A one-channel, length-preserving 1-D conv (what ECA runs across the channels)."""
    return (isinstance(module, nn.Conv1d) and module.in_channels == module.out_channels == 1
            and module.stride == (1,) and isinstance(module.padding, tuple)
            and 2 * module.padding[0] == module.dilation[0] * (module.kernel_size[0] - 1))


@torch.no_grad()
def pad_positions(conv: nn.Conv1d, removed: Sequence[int], width: int) -> None:
    """Positions ``removed`` (current numbering) of the ``width``-long channel vector ``conv`` runs
    over are cut: from now on it convolves the dense length with zeros there."""
    if not isinstance(conv, PositionPadded):
        conv.__class__ = PositionPadded
        conv.full_length = width
        conv.register_buffer("kept_positions", torch.arange(width, device=conv.weight.device), persistent=False)
    drop = torch.zeros(len(conv.kept_positions), dtype=torch.bool)
    drop[list(removed)] = True
    conv.kept_positions = conv.kept_positions[~drop.to(conv.kept_positions.device)]


_AXIS_MOVES = ("transpose", "permute", "movedim", "swapaxes", "swapdims")


def positional_pairs(model: nn.Module, calls: Sequence, taken: set[int]) -> list[tuple[int, str]]:
    """(k, conv name) for each pair of channel reshapes ``k``, ``k + 1`` (not in ``taken``) that moves
    a pooled channel vector into a length axis and back, with only a positional 1-D conv between."""
    found = []
    for k in range(len(calls) - 1):
        a, b = calls[k], calls[k + 1]
        if k in taken or k + 1 in taken or a.module != b.module or a.before != b.after:
            continue
        if a.op not in _AXIS_MOVES or b.op not in _AXIS_MOVES or a.before[1] != a.after[-1]:
            continue
        if any(d != 1 for d in a.before[2:]) or len(b.since) != 1:
            continue  # not a pooled vector, or not exactly one module between the two
        conv = model.get_submodule(b.since[0])
        if is_positional_conv(conv):
            found.append((k, b.since[0]))
    return found
