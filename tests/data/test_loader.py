"""BatchLoader / as_loader: determinism by (seed, epoch, rank), DistributedSampler sharding."""
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from kdprune.data import Augment, BatchLoader, ImageDataset, as_loader
from kdprune.data.loader import TorchLoader, mix_seed, resolve_world


def make_ds(n=10, augment=Augment(pad=1, hflip=True)):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 2, 4, 4), generator=g).to(torch.uint8)
    return ImageDataset(images, torch.arange(n), [str(i) for i in range(n)], name="toy", augment=augment)


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


def labels(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_dataset_basics():
    ds = make_ds()
    assert (ds.num_classes, ds.in_chans, ds.image_size, len(ds)) == (10, 2, (4, 4), 10)
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (2, 4, 4) and y == 3
    mean = torch.tensor(ds.mean).view(2, 1, 1)
    std = torch.tensor(ds.std).view(2, 1, 1)
    torch.testing.assert_close(x, (ds.images[3].float() / 255 - mean) / std)
    flat = ds.images.permute(1, 0, 2, 3).reshape(2, -1).double() / 255
    torch.testing.assert_close(torch.tensor(ds.mean, dtype=torch.float64), flat.mean(1))
    torch.testing.assert_close(torch.tensor(ds.std, dtype=torch.float64), flat.std(1, unbiased=False))
    # Works as a plain torch Dataset too.
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 2, 4, 4) and yb.tolist() == [0, 1, 2, 3]


def test_subset():
    ds = make_ds()
    s1, s2 = ds.subset(4, seed=1), ds.subset(4, seed=1)
    assert len(s1) == 4 and torch.equal(s1.labels, s2.labels)
    assert s1.mean == ds.mean and s1.augment == ds.augment
    s3 = ds.subset([7, 2])
    assert s3.labels.tolist() == [7, 2] and torch.equal(s3.images[0], ds.images[7])


@pytest.mark.parametrize("augment", [False, True])
def test_same_seed_epoch_identical(augment):
    ds = make_ds()
    a, b = BatchLoader(ds, 3, augment=augment, seed=5), BatchLoader(ds, 3, augment=augment, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    first = collect(a)
    assert same(first, collect(b)) and same(first, collect(a))  # re-iterating repeats the epoch
    assert sorted(labels(a)) == list(range(10))
    assert [x.dtype for x, _ in first] == [torch.float32] * 4 and first[0][1].dtype == torch.int64


def test_epoch_changes_order_and_augmentation():
    ds = make_ds(n=32)
    loader = BatchLoader(ds, 8, augment=True, seed=0)
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        orders.append(labels(loader))
    assert orders[0] != orders[1] and orders[1] != orders[2]
    # Same order via a fixed index list, so only augmentation differs between the epochs.
    plain = BatchLoader(ds, 32, shuffle=False, augment=True)
    x0 = next(iter(plain))[0]
    plain.set_epoch(1)
    assert not torch.equal(x0, next(iter(plain))[0])
    assert torch.equal(next(iter(BatchLoader(ds, 32, shuffle=False)))[0], ds.normalized())


def test_len_and_drop_last():
    ds = make_ds()
    assert len(BatchLoader(ds, 3)) == 4 and len(collect(BatchLoader(ds, 3))) == 4
    dl = BatchLoader(ds, 3, drop_last=True)
    assert len(dl) == 3 and [len(y) for _, y in dl] == [3, 3, 3]


@pytest.mark.parametrize("n", [10, 11])
def test_shards_match_distributed_sampler(n):
    ds = make_ds(n=n)
    shards = []
    for rank in range(2):
        loader = BatchLoader(ds, 2, seed=3, rank=rank, world_size=2)
        loader.set_epoch(4)
        ref = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        ref.set_epoch(4)
        got = labels(loader)
        assert got == list(ref)  # labels == indices in make_ds
        assert len(loader) == len(collect(loader)) == 3
        shards.append(got)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    if n % 2 == 0:
        assert not set(shards[0]) & set(shards[1])
    else:
        assert len(shards[0]) == len(shards[1])  # padded with one repeated sample


def test_seed_and_rank_change_augmentation():
    ds = make_ds(n=4)
    a = BatchLoader(ds, 4, shuffle=False, augment=True)
    b = BatchLoader(ds, 4, shuffle=False, augment=True, seed=1)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])
    assert len({mix_seed(0, 0, r) for r in range(8)} | {mix_seed(0, e, 0) for e in range(8)}) == 15
    with pytest.raises(ValueError):
        BatchLoader(ds, 4, rank=2, world_size=2)


def test_world_from_process_group(monkeypatch):
    import kdprune.data.loader as mod

    monkeypatch.setattr(mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(mod.dist, "get_rank", lambda: 1)
    loader = BatchLoader(make_ds(), 2)
    assert (loader.rank, loader.world_size, len(loader)) == (1, 2, 3)
    assert (resolve_world(0, 1)) == (0, 1)  # explicit values win


def test_as_loader_image_dataset():
    ds = make_ds()
    loader = as_loader(ds, 4, shuffle=True, augment=True, seed=1)
    assert isinstance(loader, BatchLoader) and loader.augment and loader.dataset is ds


def test_as_loader_tensor_dataset():
    td = TensorDataset(torch.arange(10).float().view(10, 1, 1, 1), torch.arange(10))
    loader = as_loader(td, 4, shuffle=True, seed=2)
    assert isinstance(loader, TorchLoader) and len(loader) == 3 and loader.dataset is td
    loader.set_epoch(0)
    e0 = labels(loader)
    assert e0 == labels(loader) and sorted(e0) == list(range(10))
    loader.set_epoch(1)
    assert labels(loader) != e0
    assert labels(as_loader(td, 4, shuffle=False)) == list(range(10))
    shards = [labels(as_loader(td, 4, shuffle=True, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    with pytest.warns(UserWarning, match="augment"):
        as_loader(td, 4, shuffle=False, augment=True)


def test_as_loader_dataloader():
    td = TensorDataset(torch.zeros(6, 1, 2, 2), torch.arange(6))
    sampler = DistributedSampler(td, num_replicas=2, rank=1, seed=0)
    dl = DataLoader(td, batch_size=2, sampler=sampler)
    loader = as_loader(dl, 99, shuffle=False)
    assert loader.dataset is td and len(loader) == len(dl) == 2
    loader.set_epoch(3)
    assert sampler.epoch == 3
    assert sorted(labels(loader)) == sorted(list(sampler))
    as_loader(DataLoader(td, batch_size=2), 2, shuffle=False).set_epoch(1)  # no sampler epoch: no-op
    with pytest.raises(TypeError):
        as_loader([1, 2, 3], 2, shuffle=False)
