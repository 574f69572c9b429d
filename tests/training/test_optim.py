"""Schedules follow their closed forms; OneCycle is torch's own."""
import math

import pytest
import torch

from kdprune.training.config import SGD, AdamW, Constant, Cosine, OneCycle, Step, TrainConfig
from kdprune.training.optim import build_optimizer, build_schedule


def _lrs(cfg, steps_per_epoch=5, epochs=4, lr=0.1):
    opt = build_optimizer(SGD(lr=lr), [torch.nn.Parameter(torch.zeros(1))])
    sched = build_schedule(cfg, opt, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_closed_form():
    lrs = _lrs(Cosine(min_lr=0.01))
    total = 20
    for s, lr in enumerate(lrs):
        assert lr == pytest.approx(0.01 + (0.1 - 0.01) * 0.5 * (1 + math.cos(math.pi * s / total)))


def test_cosine_warmup_is_linear():
    lrs = _lrs(Cosine(warmup_epochs=1))
    assert lrs[:5] == pytest.approx([0.1 * (s + 1) / 5 for s in range(5)])


def test_step_milestones():
    lrs = _lrs(Step(milestones=(0.5, 0.75), gamma=0.1))
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01) and lrs[15] == pytest.approx(0.001)


def test_constant():
    assert set(_lrs(Constant())) == {0.1}


def test_onecycle_matches_torch():
    ours = _lrs(OneCycle(max_lr=0.5), lr=0.5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    expected = []
    for _ in range(20):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert ours == pytest.approx(expected)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7])
def test_onecycle_on_a_few_steps_has_no_empty_phase(steps):
    lrs = _lrs(OneCycle(max_lr=0.5, pct_start=0.2), steps_per_epoch=steps, epochs=1, lr=0.5)
    assert len(lrs) == steps and all(0 < lr <= 0.5 for lr in lrs)  # was: ZeroDivisionError at 5 steps


def test_optimizer_types():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert isinstance(build_optimizer(AdamW(lr=1e-3), p), torch.optim.AdamW)
    with pytest.raises(TypeError, match="no optimizer"):
        build_optimizer(object(), p)


def test_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
