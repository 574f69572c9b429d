"""Batched, vectorised image ops on [B, C, H, W] tensors; all randomness from an explicit Generator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Training augmentation: zero-pad by `pad` then random crop back; random horizontal flip."""

    pad: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"Augment.pad must be >= 0, got {self.pad}")

    @property
    def enabled(self) -> bool:
        """True when any augmentation would change a batch."""
        return self.pad > 0 or self.hflip


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x/255 - mean) / std per channel as float32; float input is taken as already in [0, 1]."""
    x = batch.to(torch.float32)
    if not batch.is_floating_point():
        x = x / 255.0
    shape = (1, -1, 1, 1) if x.dim() == 4 else (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x - m) / s


def crop_offsets(batch_size: int, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Per-sample (top, left) crop offsets in [0, 2*padding], shape [2, B]: row 0 top, row 1 left."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2 * padding + 1, (2, batch_size), generator=generator, device=device)


def random_crop(batch: torch.Tensor, padding: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Zero-pad each side by `padding`, then crop every sample back to H x W at a random offset."""
    if padding <= 0:
        return batch
    b, c, h, w = batch.shape
    padded = F.pad(batch, (padding, padding, padding, padding))  # zeros, any dtype
    top, left = crop_offsets(b, padding, generator).to(batch.device)
    rows = top[:, None] + torch.arange(h, device=batch.device)  # [B, H]
    cols = left[:, None] + torch.arange(w, device=batch.device)  # [B, W]
    # One advanced-indexing gather: sample b takes padded[b, :, rows[b]][..., cols[b]].
    bi = torch.arange(b, device=batch.device)[:, None, None, None]
    ci = torch.arange(c, device=batch.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def flip_mask(batch_size: int, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Bool [B]: which samples to flip, each with probability p."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(batch_size, generator=generator, device=device) < p


def random_hflip(batch: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
                 ) -> torch.Tensor:
    """Flip each sample left-right with probability p (one draw per sample)."""
    mask = flip_mask(batch.shape[0], generator, p).to(batch.device)
    return torch.where(mask[:, None, None, None], batch.flip(-1), batch)


def apply_augment(batch: torch.Tensor, aug: Augment, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Crop (if aug.pad) then flip (if aug.hflip), in that fixed order so draws are reproducible."""
    if aug.pad > 0:
        batch = random_crop(batch, aug.pad, generator)
    if aug.hflip:
        batch = random_hflip(batch, generator)
    return batch
