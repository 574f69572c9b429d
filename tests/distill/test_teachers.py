"""Frozen teachers: no grads, permanently in eval mode, deterministic outputs."""
import pytest
import torch
from torch import nn

from kdprune.distill import EnsembleTeacher, FrozenTeacher, ensemble_probs, is_frozen_teacher_module, unwrap_teacher


def small_net(width: int = 4, classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


class Parent(nn.Module):
    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.student = small_net()
        self.teacher = teacher


def test_frozen_teacher_has_no_trainable_params_and_no_graph():
    torch.manual_seed(0)
    ft = FrozenTeacher(small_net())
    assert all(not p.requires_grad for p in ft.parameters())
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    out = ft(x)
    assert not out.requires_grad and out.grad_fn is None
    assert ft.is_frozen_teacher and is_frozen_teacher_module(ft)
    assert not is_frozen_teacher_module(small_net())


def test_frozen_teacher_stays_eval_after_parent_train():
    torch.manual_seed(0)
    parent = Parent(FrozenTeacher(small_net()))
    parent.train()
    assert parent.student.training
    assert not parent.teacher.training
    assert all(not m.training for m in parent.teacher.modules())
    parent.teacher.train(True)
    assert all(not m.training for m in parent.teacher.modules())


def test_frozen_teacher_output_stable_with_bn_and_dropout():
    torch.manual_seed(0)
    net = small_net()
    ft = FrozenTeacher(net)
    parent = Parent(ft)
    parent.train()
    bn = net[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x = torch.randn(4, 2, 5, 5)
    a, b = ft(x), ft(x)
    torch.testing.assert_close(a, b)
    # BatchNorm running statistics were not updated by the forwards.
    torch.testing.assert_close(bn.running_mean, stats[0])
    torch.testing.assert_close(bn.running_var, stats[1])
    assert bn.num_batches_tracked.item() == stats[2].item()


def test_rewrap_and_unwrap():
    net = small_net()
    ft = FrozenTeacher(FrozenTeacher(net))
    assert ft.model is net and unwrap_teacher(ft) is net and unwrap_teacher(net) is net


def test_ensemble_teacher_heterogeneous():
    torch.manual_seed(0)
    ens = EnsembleTeacher([small_net(4), small_net(8), FrozenTeacher(small_net(6))])
    assert len(ens) == 3 and is_frozen_teacher_module(ens)
    assert all(isinstance(t, FrozenTeacher) for t in ens.teachers)
    assert all(not p.requires_grad for p in ens.parameters())
    nn.Sequential(ens).train()
    assert all(not m.training for m in ens.modules())
    x = torch.randn(2, 2, 5, 5)
    outs = ens(x)
    assert isinstance(outs, list) and len(outs) == 3 and all(o.shape == (2, 3) for o in outs)
    torch.testing.assert_close(ens.mean_logits(x), (outs[0] + outs[1] + outs[2]) / 3)
    probs = ens.mean_probs(x, 2.0)
    torch.testing.assert_close(probs, ensemble_probs(outs, 2.0))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_ensemble_validates():
    with pytest.raises(ValueError):
        EnsembleTeacher([])
    ens = EnsembleTeacher([small_net(classes=3), small_net(classes=5)])
    with pytest.raises(ValueError, match="different shapes"):
        ens.mean_logits(torch.randn(1, 2, 4, 4))
