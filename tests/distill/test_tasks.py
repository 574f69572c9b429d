"""Tasks return logits plus weighted loss terms whose sum is the training loss."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.distill import (
    CETask,
    EnsembleTeacher,
    FrozenTeacher,
    HintKDTask,
    HintLoss,
    KDTask,
    MeanKL,
    MeanProb,
    Task,
    kd_loss,
    multi_teacher_kd_loss,
)


def net(width: int = 4, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 1])


def test_ce_task_equals_cross_entropy(batch):
    x, y = batch
    student = net()
    for ls in (0.0, 0.1):
        task = CETask(label_smoothing=ls)
        assert isinstance(task, Task) and task.modules() == []
        logits, terms = task(student, x, y)
        assert set(terms) == {"ce"}
        torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, y, label_smoothing=ls))


def test_kd_task_terms_and_teacher_gets_no_grad(batch):
    x, y = batch
    student, raw_teacher = net(4), net(8)
    task = KDTask(raw_teacher, temperature=3.0, alpha=0.7)
    assert isinstance(task, Task)
    assert isinstance(task.teacher, FrozenTeacher) and task.modules() == [task.teacher]
    student.train()
    logits, terms = task(student, x, y)
    assert set(terms) == {"ce", "kd"}
    with torch.no_grad():
        t_logits = raw_teacher(x)
    ce = F.cross_entropy(logits, y)
    kd = kd_loss(logits, t_logits, 3.0)
    torch.testing.assert_close(sum(terms.values()), 0.3 * ce + 0.7 * kd)
    torch.testing.assert_close(terms["kd"], 0.7 * kd)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in raw_teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert not raw_teacher.training


@pytest.mark.parametrize("mode", [MeanKL(), MeanProb()])
def test_kd_task_with_ensemble(batch, mode):
    x, y = batch
    student = net()
    ens = EnsembleTeacher([net(4), net(6)])
    task = KDTask(ens, temperature=2.0, alpha=0.5, teacher_mode=mode)
    assert task.teacher is ens
    logits, terms = task(student, x, y)
    expected = multi_teacher_kd_loss(logits, ens(x), 2.0, mode=mode)
    torch.testing.assert_close(terms["kd"], 0.5 * expected)


def test_kd_task_validates():
    with pytest.raises(ValueError):
        KDTask(net(), alpha=1.2)
    with pytest.raises(ValueError):
        KDTask(net(), temperature=0)
    with pytest.raises(ValueError):
        KDTask(net(), teacher_mode="max")  # type: ignore[arg-type]


def test_hint_kd_task(batch):
    x, y = batch
    student, teacher = net(4), net(8)
    hint = HintLoss([4], [8])
    task = HintKDTask(teacher, ["2"], ["2"], hint, beta=0.5, temperature=2.0, alpha=0.6)
    assert isinstance(task, Task) and task.modules() == [task.teacher, hint]
    logits, terms = task(student, x, y)
    assert set(terms) == {"ce", "kd", "hint"}
    s_feat = student[2](student[1](student[0](x)))
    with torch.no_grad():
        t_feat = teacher[2](teacher[1](teacher[0](x)))
    torch.testing.assert_close(terms["hint"], 0.5 * hint([s_feat], [t_feat]))
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in task.trainable_modules()["hint"].parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # Taps are per call: no hooks remain on either network.
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_distill_never_imports_pruning_layers():
    import subprocess
    import sys

    code = (
        "import sys, kdprune.distill; "
        "bad = [m for m in sys.modules if m.startswith(('kdprune.engine', 'kdprune.methods'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
