"""Shared fixtures: tiny seeded data sets and tiny models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdprune.data import ImageDataset


def make_images(n: int = 64, chans: int = 1, size: int = 8, classes: int = 4, seed: int = 0) -> ImageDataset:
    """A learnable toy set: each class brightens a different quadrant."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    imgs = torch.randint(0, 60, (n, chans, size, size), generator=g, dtype=torch.int64)
    h = size // 2
    for c in range(classes):
        r, q = divmod(c % 4, 2)
        imgs[labels == c, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
    return ImageDataset(imgs.clamp(0, 255).to(torch.uint8), labels, [str(i) for i in range(classes)], name="toy")


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2 + linear head: the smallest model the trainer tests need."""

    def __init__(self, in_chans: int = 1, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: tiny convs run slower with 2 threads on a shared 2-core machine
    (module scope so it also covers module-scoped fixtures)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def toy_data() -> tuple[ImageDataset, ImageDataset]:
    train = make_images(128, seed=0)
    val = make_images(32, seed=1)
    return train, ImageDataset(val.images, val.labels, val.classes, train.mean, train.std, "toy")


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def assert_resume_is_bit_exact(run, tmp_path, monkeypatch, kill_after: int = 1, before_resume=None) -> None:
    """`run(out_dir, resume) -> model`: kill it right after its `kill_after`-th epoch checkpoint
    (counted over all its training stages), call `before_resume()` if given (what changed between
    the two processes), resume it, and require the same weights, bit for bit, as an uninterrupted run."""
    from kdprune.training import loop

    ref = run(tmp_path / "ref", False)
    real_write, written = loop._write_epoch, []

    def write_then_die(*args, **kw):
        real_write(*args, **kw)
        written.append(1)
        if len(written) == kill_after:
            raise KeyboardInterrupt("killed after epoch checkpoint")

    monkeypatch.setattr(loop, "_write_epoch", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", False)
    monkeypatch.setattr(loop, "_write_epoch", real_write)
    if before_resume is not None:
        before_resume()
    a, b = ref.state_dict(), run(tmp_path / "run", True).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
