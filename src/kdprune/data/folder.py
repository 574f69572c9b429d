"""ImageFolder layout (root/class_name/*.png|jpg|jpeg) read into memory with Pillow."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _size_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def list_images(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(file, label) pairs, files sorted by name inside each class folder."""
    out = []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue  # a val split may lack some train classes
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        out += [(p, label) for p in files]
    return out


def load_image(path: Path, in_chans: int, size_hw: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 [C, H, W] (grayscale for in_chans=1, RGB for 3), optionally resized."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if in_chans == 1 else "RGB")
            if size_hw is not None and im.size != (size_hw[1], size_hw[0]):
                im = im.resize((size_hw[1], size_hw[0]), Image.BILINEAR)  # PIL takes (W, H)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e}); delete or replace the file") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image_folder(
    root: str | Path,
    in_chans: int = 3,
    image_size: int | Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images [N,C,H,W], int64 labels [N], sorted class names) from an ImageFolder tree."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected root/<class>/*.png|jpg")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    else:
        # Val labels must use the train mapping; a class unknown to train cannot be scored.
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DatasetError(f"{root}: class folders {extra} are not among the train classes")
    items = list_images(root, classes)
    if not items:
        raise DatasetError(f"{root}: no {'/'.join(IMAGE_EXTENSIONS)} images in any class folder")
    size_hw = _size_hw(image_size)
    arrays = [load_image(p, in_chans, size_hw) for p, _ in items]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DatasetError(
            f"{root}: images have different sizes {sorted(shapes)[:4]}...; pass image_size= to resize"
        )
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([lab for _, lab in items], dtype=torch.int64)
    return images, labels, list(classes)
