"""Named data sets: load(name, root) -> (train, val) ImageDatasets, with roots and default augmentation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from kdprune.registry import Registry

from .cifar import read_cifar
from .datasets import ImageDataset
from .errors import DatasetError
from .folder import read_image_folder
from .idx import read_idx
from .transforms import Augment

Loader = Callable[..., tuple[ImageDataset, ImageDataset]]
DATASETS: Registry[Loader] = Registry("dataset")

ENV_ROOT = "KDPRUNE_DATA_ROOT"
SYSTEM_ROOT = Path("/usr/share/datasets")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100",
            "cifar_100": "cifar100", "image-folder": "imagefolder", "image_folder": "imagefolder"}


def candidate_roots(root: str | Path | None, subdir: str, system_default: bool) -> list[Path]:
    """Folders to try, in order: root=, else $KDPRUNE_DATA_ROOT/<subdir> then itself, else the system path."""
    if root is not None:
        return [Path(root).expanduser()]
    env = os.environ.get(ENV_ROOT)
    if env:
        base = Path(env).expanduser()
        return [base / subdir, base]
    return [SYSTEM_ROOT / subdir] if system_default else []


def pick_root(cands: list[Path], what: str, fix: str) -> Path:
    """The first existing folder among cands, else FileNotFoundError naming them and the fix."""
    for c in cands:
        if c.is_dir():
            return c
    tried = ", ".join(str(c) for c in cands) or f"nothing (no root= given and ${ENV_ROOT} unset)"
    raise FileNotFoundError(f"{what} not found: tried {tried}. Fix: {fix}")


def _find_idx(base: Path, stem: str, subdirs: Sequence[str], what: str, fix: str) -> Path:
    """Locate e.g. train-images-idx3-ubyte[.gz] (or train-images.idx3-ubyte) under base."""
    names = [stem, stem.replace("-idx", ".idx")]
    dirs = [base] + [base / s for s in subdirs]
    for d in dirs:
        for n in names:
            for suffix in (".gz", ""):
                if (d / (n + suffix)).is_file():
                    return d / (n + suffix)
    raise FileNotFoundError(f"{what} not found: no {stem}[.gz] in {', '.join(map(str, dirs))}. Fix: {fix}")


def _idx_split(base: Path, prefix: str, n_classes: int, subdirs: Sequence[str], what: str, fix: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    img_path = _find_idx(base, f"{prefix}-images-idx3-ubyte", subdirs, what, fix)
    lab_path = _find_idx(base, f"{prefix}-labels-idx1-ubyte", subdirs, what, fix)
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise DatasetError(
            f"{img_path}: expected uint8 [N,H,W] images, got {images.dtype}{list(images.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(
            f"{lab_path}: {list(labels.shape)} labels for {images.shape[0]} images in {img_path}"
        )
    labels = labels.to(torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{lab_path}: labels outside [0, {n_classes}); file is corrupt")
    return images.unsqueeze(1), labels


def _make_pair(name: str, train: tuple, val: tuple, classes: Sequence[str], augment: Augment
               ) -> tuple[ImageDataset, ImageDataset]:
    """Train set computes mean/std; val reuses them so both splits are normalised identically."""
    tr = ImageDataset(train[0], train[1], classes, name=name, augment=augment)
    va = ImageDataset(val[0], val[1], classes, tr.mean, tr.std, name=name, augment=augment)
    return tr, va


def _load_idx_set(name: str, root, augment: Augment, classes: Sequence[str], subdirs: Sequence[str],
                  what: str, fix: str) -> tuple[ImageDataset, ImageDataset]:
    base = pick_root(candidate_roots(root, name, system_default=True), what, fix)
    train = _idx_split(base, "train", len(classes), subdirs, what, fix)
    val = _idx_split(base, "t10k", len(classes), subdirs, what, fix)
    return _make_pair(name, train, val, classes, augment)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: str | Path | None = None, augment: Augment | None = None
                       ) -> tuple[ImageDataset, ImageDataset]:
    """Fashion-MNIST (60000/10000, 1x28x28, 10 classes) from its four IDX files."""
    fix = ("`apt-get install dataset-fashion-mnist` (Debian) or pass --data-root / root= "
           "to a folder holding the IDX files")
    return _load_idx_set("fashion-mnist", root, augment or Augment(pad=2, hflip=True),
                         FASHION_CLASSES, ("raw", "FashionMNIST/raw"), "Fashion-MNIST", fix)


@DATASETS.register("mnist")
def load_mnist(root: str | Path | None = None, augment: Augment | None = None
               ) -> tuple[ImageDataset, ImageDataset]:
    """MNIST (60000/10000, 1x28x28, 10 digits) from its four IDX files; digits are not flipped."""
    fix = ("download the four MNIST IDX files (train/t10k images/labels, .gz is fine) into a folder "
           "and pass --data-root / root= to it (or put them in /usr/share/datasets/mnist)")
    return _load_idx_set("mnist", root, augment or Augment(pad=2, hflip=False),
                         tuple(str(i) for i in range(10)), ("raw", "MNIST/raw"), "MNIST", fix)


def _load_cifar(variant: int, root, augment: Augment | None) -> tuple[ImageDataset, ImageDataset]:
    name = f"cifar{variant}"
    fix = (f"download https://www.cs.toronto.edu/~kriz/cifar-{variant}-python.tar.gz, extract it "
           f"and pass --data-root / root= (or set ${ENV_ROOT}) to the extracted folder or its parent")
    base = pick_root(candidate_roots(root, name, system_default=True), f"CIFAR-{variant}", fix)
    xtr, ytr, classes = read_cifar(base, variant, train=True)
    xva, yva, _ = read_cifar(base, variant, train=False)
    return _make_pair(name, (xtr, ytr), (xva, yva), classes, augment or Augment(pad=4, hflip=True))


@DATASETS.register("cifar10")
def load_cifar10(root: str | Path | None = None, augment: Augment | None = None
                 ) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10 (50000/10000, 3x32x32) from the python-pickle batches."""
    return _load_cifar(10, root, augment)


@DATASETS.register("cifar100")
def load_cifar100(root: str | Path | None = None, augment: Augment | None = None
                  ) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-100 fine labels (50000/10000, 3x32x32) from the python-pickle files."""
    return _load_cifar(100, root, augment)


@DATASETS.register("imagefolder")
def load_imagefolder(
    root: str | Path | None = None,
    augment: Augment | None = None,
    in_chans: int = 3,
    image_size: int | Sequence[int] | None = None,
    train_dir: str = "train",
    val_dir: str = "val",
) -> tuple[ImageDataset, ImageDataset]:
    """root/train/<class>/*.png|jpg and root/val/<class>/...; val uses train's class list."""
    fix = (f"pass --data-root / root= (or set ${ENV_ROOT}) to a folder with {train_dir}/<class>/*.png "
           f"and {val_dir}/<class>/*.png")
    base = pick_root(candidate_roots(root, "imagefolder", system_default=False), "image folder", fix)
    for sub in (train_dir, val_dir):
        if not (base / sub).is_dir():
            raise FileNotFoundError(f"image folder: {base / sub} does not exist. Fix: {fix}")
    xtr, ytr, classes = read_image_folder(base / train_dir, in_chans, image_size)
    if image_size is None:
        image_size = tuple(xtr.shape[2:])  # val must match train's size to batch and evaluate
    xva, yva, _ = read_image_folder(base / val_dir, in_chans, image_size, classes=classes)
    name = base.name or "imagefolder"
    return _make_pair(name, (xtr, ytr), (xva, yva), classes, augment or Augment(hflip=True))


def load(name: str, root: str | Path | None = None, **kw) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) ImageDatasets for a registered data set name; see list_datasets()."""
    key = name.strip().lower()
    return DATASETS.get(_ALIASES.get(key, key))(root=root, **kw)


class Splits(NamedTuple):
    """Train (minus the held-out rows), validation (carved from train) and test sets."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


#: The seed of every validation split carved from a training set (train and compress --val-split,
#: load_splits' default): the same images are held out everywhere, so a base trained without
#: them (the shipped option-B base) never saw the images a later compression chooses on.
SPLIT_SEED = 0


def load_splits(name: str, val: int = 5000, seed: int = SPLIT_SEED, root: str | Path | None = None, **kw) -> Splits:
    """Train/validation/test: ``val`` training images held out (stratified, seeded) for every
    choice a run makes; the set's own test split is only for reporting."""
    train, test = load(name, root=root, **kw)
    rest, held = train.split(val, seed=seed)
    return Splits(rest, held, test)


def list_datasets() -> list[str]:
    """Registered data set names."""
    return DATASETS.names()
