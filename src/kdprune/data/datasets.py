"""In-memory uint8 image data set with per-channel normalisation statistics."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from .transforms import Augment, normalize


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N,C,H,W] on the [0, 1] scale."""
    if images.shape[0] == 0:
        raise ValueError("cannot compute mean/std of an empty image set")
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        # A 256-bin histogram is exact for uint8 and far cheaper than float sums over every pixel.
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * levels).sum() / n
        var = (counts * (levels - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-6))  # constant images: avoid division by zero
    return tuple(means), tuple(stds)


class ImageDataset(Dataset):
    """uint8 images [N,C,H,W] + int64 labels; __getitem__ returns (normalised float32 CxHxW, int).

    `mean`/`std` come from the train split and are passed to the val split so both are
    normalised identically; `augment` is applied only by BatchLoader(augment=True).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "",
        augment: Augment = Augment(),
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype}{list(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{labels.shape[0] if labels.dim() else 0} labels for {images.shape[0]} images")
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std, or neither (then they are computed)")
        if mean is None:
            mean, std = channel_stats(images)
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} values, got {len(mean)}/{len(std)}")
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        self.augment = augment

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return normalize(self.images[i], self.mean, self.std), int(self.labels[i])

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
                f"classes={self.num_classes})")

    @property
    def num_classes(self) -> int:
        """Number of classes (length of `classes`)."""
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        """Channels per image (1 grayscale, 3 RGB)."""
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return (self.images.shape[2], self.images.shape[3])

    def normalized(self, indices: torch.Tensor | slice | None = None) -> torch.Tensor:
        """A normalised float32 batch of the given rows (all rows when None)."""
        x = self.images if indices is None else self.images[indices]
        return normalize(x, self.mean, self.std)

    def split(self, n_val: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """(rest, held out): ``n_val`` rows drawn per class in proportion to its share, with
        ``seed``; both keep this set's normalisation and order. Carve the validation split for
        every choice (defaults, best checkpoint, best replica) from the training set this way,
        so that the test set is only ever reported."""
        if not 0 < n_val < len(self):
            raise ValueError(f"validation split of {n_val} outside (0, {len(self)})")
        g = torch.Generator().manual_seed(seed)
        counts = torch.bincount(self.labels, minlength=len(self.classes)).double()
        share = counts * n_val / len(self)
        take = share.floor().long()
        rest = (share - take).argsort(descending=True)[: n_val - int(take.sum())]
        take[rest] += 1  # largest remainders: exactly n_val rows in all
        held = []
        for c in range(len(self.classes)):
            rows = (self.labels == c).nonzero().flatten()
            held.append(rows[torch.randperm(len(rows), generator=g)[: int(take[c])]])
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[torch.cat(held)] = True
        return self.subset(torch.nonzero(~mask).flatten()), self.subset(torch.nonzero(mask).flatten())

    def subset(self, indices_or_n: int | Sequence[int] | torch.Tensor, seed: int = 0) -> ImageDataset:
        """A data set of the given rows, or of n rows drawn without replacement with `seed`."""
        if isinstance(indices_or_n, int):
            n = indices_or_n
            if not 0 <= n <= len(self):
                raise ValueError(f"subset size {n} outside [0, {len(self)}]")
            g = torch.Generator().manual_seed(seed)
            # Sorted so the subset keeps the original order (stable, easy to inspect).
            idx = torch.randperm(len(self), generator=g)[:n].sort().values
        else:
            idx = torch.as_tensor(indices_or_n, dtype=torch.int64)
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.mean, self.std,
                            self.name, self.augment)
