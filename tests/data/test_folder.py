"""ImageFolder reader: PNG/JPEG via Pillow, sorted classes, grayscale/RGB, resize."""
import numpy as np
import pytest
import torch
from PIL import Image

from kdprune.data import DatasetError
from kdprune.data.folder import read_image_folder


def write(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    # Class folders created out of order: the reader must sort them.
    for cls, names in (("cat", ["b.png", "a.png"]), ("ant", ["x.PNG"]), ("bee", ["k.png"])):
        for n in names:
            arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            write(tmp_path / cls / n, arr)
            imgs[(cls, n)] = arr
    write(tmp_path / "bee" / "j.jpg", np.full((6, 5, 3), 128, dtype=np.uint8))
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    return tmp_path, imgs


def test_read_rgb(tree):
    root, imgs = tree
    x, y, classes = read_image_folder(root, in_chans=3)
    assert classes == ["ant", "bee", "cat"]
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 6, 5)
    # order: ant/x.PNG, bee/j.jpg, bee/k.png, cat/a.png, cat/b.png
    assert y.tolist() == [0, 1, 1, 2, 2]
    assert torch.equal(x[0], torch.from_numpy(imgs[("ant", "x.PNG")]).permute(2, 0, 1))
    assert torch.equal(x[3], torch.from_numpy(imgs[("cat", "a.png")]).permute(2, 0, 1))
    assert (x[1].int() - 128).abs().max() <= 3  # JPEG is lossy, but a flat image stays close


def test_grayscale_and_resize(tree):
    root, imgs = tree
    x, _, _ = read_image_folder(root, in_chans=1, image_size=(4, 8))
    assert x.shape == (5, 1, 4, 8)
    x, _, _ = read_image_folder(root, in_chans=1)
    expect = np.array(Image.fromarray(imgs[("ant", "x.PNG")]).convert("L"))
    assert torch.equal(x[0, 0], torch.from_numpy(expect))


def test_mixed_sizes_need_image_size(tmp_path):
    write(tmp_path / "a" / "1.png", np.zeros((4, 4), dtype=np.uint8))
    write(tmp_path / "a" / "2.png", np.zeros((5, 4), dtype=np.uint8))
    with pytest.raises(DatasetError, match="image_size"):
        read_image_folder(tmp_path, in_chans=1)
    x, _, _ = read_image_folder(tmp_path, in_chans=1, image_size=3)
    assert x.shape == (2, 1, 3, 3)


def test_val_uses_train_classes(tree, tmp_path):
    root, _ = tree
    val = tmp_path / "val"
    write(val / "cat" / "z.png", np.zeros((6, 5, 3), dtype=np.uint8))
    _, y, classes = read_image_folder(val, classes=["ant", "bee", "cat"])
    assert y.tolist() == [2] and classes == ["ant", "bee", "cat"]
    write(val / "dog" / "z.png", np.zeros((6, 5, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="dog"):
        read_image_folder(val, classes=["ant", "bee", "cat"])


def test_corrupt_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="bad.png"):
        read_image_folder(tmp_path)
