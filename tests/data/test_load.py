"""load(): registry, roots ($KDPRUNE_DATA_ROOT), defaults, errors, and the real Fashion-MNIST."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdprune.data import Augment, list_datasets, load
from kdprune.data.idx import write_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def make_idx_set(d: Path, n_train=12, n_test=6, gz=True):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))
    return d


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("KDPRUNE_DATA_ROOT", raising=False)


def test_list_and_unknown():
    assert list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "imagefolder", "mnist"]
    with pytest.raises(KeyError, match="fashion-mnist"):
        load("svhn")


def test_fashion_mnist_synthetic(tmp_path):
    tr, va = load("fashion-mnist", root=make_idx_set(tmp_path / "fm"))
    assert (len(tr), len(va), tr.in_chans, tr.image_size, tr.num_classes) == (12, 6, 1, (28, 28), 10)
    assert va.mean == tr.mean and va.std == tr.std and tr.classes[0] == "T-shirt/top"
    assert tr.augment == Augment(pad=2, hflip=True)
    assert tr.labels.dtype == torch.int64 and tr.labels.tolist() == [i % 10 for i in range(12)]


def test_mnist_raw_subdir_and_env(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "mnist" / "raw", gz=False)
    monkeypatch.setenv("KDPRUNE_DATA_ROOT", str(tmp_path))
    tr, va = load("mnist")
    assert (len(tr), len(va)) == (12, 6) and tr.augment == Augment(pad=2, hflip=False)
    tr, _ = load("MNIST", augment=Augment(pad=1))
    assert tr.augment == Augment(pad=1)


def test_missing_fashion_mnist(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        load("fashion-mnist", root=missing)
    assert str(missing) in str(e.value) and "apt-get install dataset-fashion-mnist" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load("fashion-mnist", root=tmp_path / "empty")


def test_cifar10_via_env(tmp_path, monkeypatch):
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        b = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
        (d / f).write_bytes(pickle.dumps(b, protocol=2))
    monkeypatch.setenv("KDPRUNE_DATA_ROOT", str(tmp_path))
    tr, va = load("cifar10")
    assert (len(tr), len(va), tr.in_chans, tr.image_size) == (10, 2, 3, (32, 32))
    assert tr.augment == Augment(pad=4, hflip=True) and len(tr.mean) == 3 and va.mean == tr.mean
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
        load("cifar100")


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("b", "a"):
            for i in range(n):
                p = tmp_path / split / cls / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (5 + i, 6, 3), dtype=np.uint8)).save(p)
    tr, va = load("imagefolder", root=tmp_path, image_size=8)
    assert tr.classes == ["a", "b"] and tr.images.shape == (4, 3, 8, 8) and va.images.shape == (2, 3, 8, 8)
    assert tr.augment == Augment(hflip=True) and va.labels.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError, match="val"):
        load("imagefolder", root=tmp_path / "train")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    tr, va = load("fashion-mnist")
    assert (len(tr), len(va)) == (60000, 10000)
    assert (tr.in_chans, tr.image_size, tr.num_classes) == (1, (28, 28), 10)
    assert abs(tr.mean[0] - 0.2860) < 1e-3 and abs(tr.std[0] - 0.3530) < 1e-3
    assert torch.bincount(tr.labels).tolist() == [6000] * 10


def test_validation_split_is_carved_from_train_stratified_and_seeded(tmp_path):
    from kdprune.data import load_splits

    root = make_idx_set(tmp_path / "fm", n_train=40, n_test=6)  # 4 images per class
    s = load_splits("fashion-mnist", val=10, seed=3, root=root)
    full, test = load("fashion-mnist", root=root)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 6)
    assert torch.equal(s.test.images, test.images)  # the test set is untouched
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [1] * 10  # one per class
    rows = lambda d: {bytes(x.numpy().tobytes()) for x in d.images}  # noqa: E731
    assert rows(s.train) | rows(s.val) == rows(full) and not rows(s.train) & rows(s.val)  # a partition
    assert s.val.mean == full.mean and s.val.std == full.std  # same normalisation as training
    again = load_splits("fashion-mnist", val=10, seed=3, root=root)
    assert torch.equal(again.val.images, s.val.images)  # deterministic
    assert not torch.equal(load_splits("fashion-mnist", val=10, seed=4, root=root).val.images, s.val.images)
    tr, va = full.split(7)  # 7 of 10 classes get one row: largest remainders, exactly n
    assert len(va) == 7 and len(tr) == 33
    with pytest.raises(ValueError, match="outside"):
        full.split(40)
