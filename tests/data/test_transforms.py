"""Batched transforms against slow per-sample references with the same generator state."""
import dataclasses

import pytest
import torch

from kdprune.data import Augment
from kdprune.data.transforms import apply_augment, flip_mask, normalize, random_crop, random_hflip


def ref_crop(batch, padding, offsets):
    """Per-sample reference: explicit zero canvas, paste, slice at (top, left)."""
    b, c, h, w = batch.shape
    out = torch.empty_like(batch)
    for i in range(b):
        canvas = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=batch.dtype)
        canvas[:, padding:padding + h, padding:padding + w] = batch[i]
        top, left = int(offsets[0, i]), int(offsets[1, i])
        out[i] = canvas[:, top:top + h, left:left + w]
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_matches_reference(dtype):
    x = (torch.arange(16 * 3 * 5 * 6) % 251 + 1).reshape(16, 3, 5, 6).to(dtype)
    out = random_crop(x, 2, torch.Generator().manual_seed(7))
    offsets = torch.randint(0, 5, (2, 16), generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, ref_crop(x, 2, offsets))
    assert out.dtype == dtype and out.shape == x.shape
    assert len({(int(a), int(b)) for a, b in offsets.T}) > 1  # samples really differ


def test_random_crop_hand_computed():
    x = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 1, 3, 3)
    g = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 3, (2, 1), generator=torch.Generator().manual_seed(0)).flatten().tolist()
    padded = [[0] * 5, [0, 1, 2, 3, 0], [0, 4, 5, 6, 0], [0, 7, 8, 9, 0], [0] * 5]
    expect = [row[left:left + 3] for row in padded[top:top + 3]]
    assert random_crop(x, 1, g)[0, 0].tolist() == expect


def test_random_crop_zero_padding_is_identity():
    x = torch.rand(2, 1, 3, 3)
    assert random_crop(x, 0, torch.Generator()) is x


def test_hflip_matches_flip_on_chosen():
    x = torch.randint(0, 255, (32, 2, 4, 5), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    out = random_hflip(x, torch.Generator().manual_seed(3))
    mask = flip_mask(32, torch.Generator().manual_seed(3))
    assert 0 < mask.sum() < 32
    assert torch.equal(out[mask], torch.flip(x[mask], dims=[-1]))
    assert torch.equal(out[~mask], x[~mask])


def test_normalize_closed_form():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 1, 1, 3).repeat(1, 2, 1, 1)
    out = normalize(x, (0.5, 0.2), (0.25, 0.1))
    assert out.dtype == torch.float32
    expect0 = torch.tensor([(0 - 0.5) / 0.25, (0.2 - 0.5) / 0.25, (1 - 0.5) / 0.25])
    expect1 = torch.tensor([(0 - 0.2) / 0.1, (0.2 - 0.2) / 0.1, (1 - 0.2) / 0.1])
    torch.testing.assert_close(out[0, 0, 0], expect0)
    torch.testing.assert_close(out[0, 1, 0], expect1)
    torch.testing.assert_close(normalize(x[0].float() / 255, (0.5, 0.2), (0.25, 0.1)), out[0])


def test_augment_config():
    a = Augment(pad=2, hflip=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.pad = 3
    with pytest.raises(ValueError):
        Augment(pad=-1)
    assert not Augment().enabled
    x = torch.rand(4, 1, 3, 3)
    assert apply_augment(x, Augment(), torch.Generator()) is x
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(apply_augment(x, a, g1), random_hflip(random_crop(x, 2, g2), g2))
