"""Deterministic, shard-aware batch iteration over in-memory data sets (and torch Datasets)."""
from __future__ import annotations

import math
import warnings
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .datasets import ImageDataset
from .transforms import apply_augment, normalize


@runtime_checkable
class EpochLoader(Protocol):
    """What every loader from as_loader offers: set_epoch, iteration, length, dataset."""

    dataset: Dataset

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that determines shuffling/augmentation."""

    def __iter__(self) -> Iterator: ...

    def __len__(self) -> int: ...


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): explicit values win, else the initialised process group, else (0, 1)."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised and world_size > 1 else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank, ...); nearby inputs do not collide."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


class BatchLoader:
    """Batches (x float32 [B,C,H,W] normalised, y int64 [B]) from an ImageDataset.

    Order and augmentation depend only on (seed, epoch, rank): call set_epoch(epoch) every
    epoch, as with DistributedSampler. Indices come from a DistributedSampler (num_replicas=1
    when not distributed), so sharding and padding are exactly torch's standard behaviour.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank, self.world_size = resolve_world(rank, world_size)
        self.epoch = 0
        # drop_last=False here: the sampler pads so every rank sees the same number of samples.
        self.sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle order and augmentation draws the next iteration uses."""
        self.epoch = int(epoch)
        self.sampler.set_epoch(self.epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order."""
        return torch.tensor(list(self.sampler), dtype=torch.int64)

    def __len__(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        ds = self.dataset
        use_aug = self.augment and ds.augment.enabled
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        for b in range(len(self)):
            bidx = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = ds.images[bidx]
            if use_aug:
                x = apply_augment(x, ds.augment, gen)  # on uint8, so padding is black like torchvision
            yield normalize(x, ds.mean, ds.std), ds.labels[bidx]


class TorchLoader:
    """A torch DataLoader with set_epoch: reseeds its RandomSampler or forwards to its sampler."""

    def __init__(self, loader: DataLoader, generator: torch.Generator | None = None, seed: int = 0
                 ) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self._generator = generator  # set when we built a RandomSampler: reseeded per epoch
        self._seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; forwards to samplers that have set_epoch (e.g. DistributedSampler)."""
        self.epoch = int(epoch)
        samplers = [self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None)]
        seen: set[int] = set()
        for s in samplers:
            if s is not None and id(s) not in seen and hasattr(s, "set_epoch"):
                seen.add(id(s))
                s.set_epoch(self.epoch)

    def __iter__(self) -> Iterator:
        if self._generator is not None:
            # Same (seed, epoch) as DistributedSampler uses, so re-iterating an epoch repeats it.
            self._generator.manual_seed(self._seed + self.epoch)
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _plain_loader(data: Dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                  rank: int, world_size: int) -> TorchLoader:
    gen = None
    if world_size > 1:
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=seed, drop_last=False)
    elif shuffle:
        gen = torch.Generator()
        sampler = RandomSampler(data, generator=gen)
    else:
        sampler = SequentialSampler(data)
    dl = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=0)
    return TorchLoader(dl, gen, seed)


def as_loader(
    data: ImageDataset | Dataset | DataLoader,
    batch_size: int,
    shuffle: bool,
    augment: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> BatchLoader | TorchLoader:
    """A loader with set_epoch/__iter__/__len__/dataset for an ImageDataset, Dataset or DataLoader."""
    if isinstance(data, ImageDataset):
        return BatchLoader(data, batch_size, shuffle, augment, drop_last, seed, rank, world_size)
    if isinstance(data, DataLoader):
        # Already configured by the caller: batch_size/shuffle/seed are theirs, not ours.
        return TorchLoader(data)
    if isinstance(data, Dataset):
        if augment:
            warnings.warn("augment=True is ignored for a plain torch Dataset: put transforms in "
                          "the dataset itself, or use an ImageDataset", stacklevel=2)
        r, w = resolve_world(rank, world_size)
        return _plain_loader(data, batch_size, shuffle, drop_last, seed, r, w)
    raise TypeError(
        f"as_loader needs an ImageDataset, torch Dataset or DataLoader, got {type(data).__name__}"
    )
