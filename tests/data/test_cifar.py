"""CIFAR python-pickle batches: layout, both variants, and refusal of non-CIFAR globals."""
import os
import pickle

import numpy as np
import pytest
import torch

from kdprune.data import DatasetError
from kdprune.data.cifar import load_pickle, read_batch, read_cifar


def batch(n: int, seed: int, label_key: str = "labels", n_classes: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"batch", label_key.encode(): rng.integers(0, n_classes, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root, n=3):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        dump(d / f"data_batch_{i}", batch(n, i))
    dump(d / "test_batch", batch(n, 99))
    dump(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return d


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_layout_known_pixel(tmp_path, protocol):
    b = batch(4, 0)
    # pixel (n=2, c=1 green, h=5, w=7) sits at offset c*1024 + h*32 + w of row n.
    b[b"data"][2, 1 * 1024 + 5 * 32 + 7] = 201
    dump(tmp_path / "data_batch_1", b, protocol)
    x, y = read_batch(tmp_path / "data_batch_1")
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    assert x[2, 1, 5, 7] == 201
    assert torch.equal(x.reshape(4, -1), torch.from_numpy(b[b"data"]))
    assert y.dtype == torch.int64 and y.tolist() == b[b"labels"]


def test_numpy1_module_names(tmp_path):
    # Files written under numpy 1.x reference numpy.core.multiarray; both spellings must load.
    blob = pickle.dumps(batch(2, 3), protocol=2)
    assert b"numpy._core.multiarray" in blob
    (tmp_path / "b").write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, _ = read_batch(tmp_path / "b")
    assert x.shape == (2, 3, 32, 32)


def test_cifar10_folder_or_parent(tmp_path):
    d = make_cifar10(tmp_path)
    for root in (d, tmp_path):
        x, y, classes = read_cifar(root, 10, train=True)
        assert x.shape == (15, 3, 32, 32) and y.shape == (15,)
        assert classes == [f"c{i}" for i in range(10)]
    xt, _, _ = read_cifar(tmp_path, 10, train=False)
    assert torch.equal(xt.reshape(3, -1), torch.from_numpy(batch(3, 99)[b"data"]))


def test_cifar100(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    dump(d / "train", batch(4, 1, "fine_labels", 100))
    dump(d / "test", batch(2, 2, "fine_labels", 100))
    dump(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                      b"coarse_label_names": [b"x"] * 20})
    x, y, classes = read_cifar(tmp_path, 100, train=True)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == batch(4, 1, "fine_labels", 100)[b"fine_labels"]
    assert len(classes) == 100 and classes[3] == "f3"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalEvil:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize("evil", ["system", "eval"])
def test_forbidden_global_refused(tmp_path, evil):
    marker = tmp_path / "pwned"
    obj = Evil(marker) if evil == "system" else EvalEvil()
    path = tmp_path / "data_batch_1"
    dump(path, {b"data": obj, b"labels": [0]})
    with pytest.raises(DatasetError, match="refusing to load global") as e:
        load_pickle(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_not_a_batch(tmp_path):
    dump(tmp_path / "b", {b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetError, match="expected uint8"):
        read_batch(tmp_path / "b")
    (tmp_path / "t").write_bytes(pickle.dumps(batch(2, 0))[:100])
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        load_pickle(tmp_path / "t")


def test_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        read_cifar(tmp_path, 10)
