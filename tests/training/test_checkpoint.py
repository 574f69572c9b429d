"""Checkpoints: RNG round-trip, atomic write, weights_only load, clear errors."""
import random

import numpy as np
import pytest
import torch

from kdprune.training.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint


def test_rng_roundtrip_through_file(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng()})
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"])
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_atomic_write_leaves_no_temp(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(2)})
    save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["x"], torch.zeros(2))
