"""Training compute, counted (training/compute.py): a step's FLOPs from its ops' shapes, forward and
backward of the trained model plus the forward of a frozen teacher, scaled by the images each
epoch saw; a compression run's total sums its stages; a resumed run counts what an uninterrupted
one does."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdprune as kp
from kdprune.distill import KDTask
from kdprune.training import compute

from ..conftest import TinyNet

IN, OUT, N = 12, 5, 40  # 40 images in batches of 16: two full batches a step (the loader drops the rest)
SEEN = 32


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, IN, generator=g), torch.randint(0, OUT, (N,), generator=g))


def _cfg(epochs: int = 2) -> kp.TrainConfig:
    return kp.TrainConfig(epochs=epochs, batch_size=16, progress=False, augment=False)


def test_a_linear_model_costs_four_flops_per_weight_per_image_seen():
    """forward 2 * IN * OUT per image (addmm), backward the same for the weight's gradient (the input
    needs none), over the images each epoch saw."""
    torch.manual_seed(0)
    with compute.tally() as spent:
        res = kp.train(nn.Linear(IN, OUT), _data(), config=_cfg())
    assert [row["train_flops"] for row in res.history] == [4 * IN * OUT * SEEN] * 2
    assert spent.total == 2 * 4 * IN * OUT * SEEN


def test_a_frozen_teacher_adds_its_forward_only():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, OUT))
    res = kp.train(nn.Linear(IN, OUT), _data(), config=_cfg(1), task=KDTask(teacher))
    assert res.history[0]["train_flops"] == (4 * IN * OUT + 2 * (IN * 32 + 32 * OUT)) * SEEN


def test_compress_reports_the_sum_of_its_stages_and_a_resume_counts_the_same(toy_data, tmp_path):
    train, val = toy_data
    recipe = kp.recipes.KDFinetune(target_flops=0.6, finetune=kp.TrainConfig(epochs=2, batch_size=32, progress=False))
    res = kp.compress(_net(), recipe, train, val, out_dir=tmp_path / "a", latency=False, factory=_net)
    stage = compute.history_flops(res.report["method"]["finetune"])
    assert stage > 0 and res.report["train_flops"] >= stage  # plus the BN re-estimation's forwards
    again = kp.compress(_net(), recipe, train, val, out_dir=tmp_path / "a", resume=True, latency=False, factory=_net)
    assert again.report["train_flops"] == res.report["train_flops"]


def _net() -> TinyNet:
    """Factory for save/load of the test model."""
    torch.manual_seed(0)
    return TinyNet(width=32)
