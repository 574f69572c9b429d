"""KD losses against closed forms computed with explicit sums (no F.kl_div)."""
import math

import pytest
import torch

from kdprune.distill import (
    MeanKL, MeanProb, ensemble_probs, kd_loss, kd_objective, multi_teacher_kd_loss, soft_targets,
)

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T1 = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
T2 = [[-1.0, 0.5, 0.0], [3.0, 0.0, 1.0]]


def softmax_rows(rows, temp):
    out = []
    for r in rows:
        e = [math.exp(v / temp) for v in r]
        z = sum(e)
        out.append([v / z for v in e])
    return out


def kl_rows(p_rows, q_rows):
    """batchmean KL(p || q) with explicit sums."""
    total = sum(p * (math.log(p) - math.log(q)) for pr, qr in zip(p_rows, q_rows) for p, q in zip(pr, qr))
    return total / len(p_rows)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_kd_loss_closed_form():
    temp = 2.0
    expected = temp**2 * kl_rows(softmax_rows(T1, temp), softmax_rows(S, temp))
    got = kd_loss(t(S), t(T1), temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() > 0


def test_kd_loss_zero_when_equal():
    x = torch.randn(4, 5)
    assert kd_loss(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_gradient_closed_form():
    temp = 2.0
    s = t(S).requires_grad_(True)
    kd_loss(s, t(T1), temp).backward()
    p_s, p_t = t(softmax_rows(S, temp)), t(softmax_rows(T1, temp))
    expected = temp * (p_s - p_t) / len(S)
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_kd_loss_no_grad_into_teacher():
    s, te = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    kd_loss(s, te).backward()
    assert te.grad is None and s.grad is not None


def test_kd_loss_validates():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_soft_targets_and_ensemble_probs():
    temp = 2.0
    torch.testing.assert_close(soft_targets(t(T1), temp), t(softmax_rows(T1, temp)))
    p1, p2 = softmax_rows(T1, temp), softmax_rows(T2, temp)
    mean = [[(a + b) / 2 for a, b in zip(r1, r2)] for r1, r2 in zip(p1, p2)]
    torch.testing.assert_close(ensemble_probs([t(T1), t(T2)], temp), t(mean))


def test_multi_teacher_mean_kl_closed_form():
    temp = 2.0
    p_s = softmax_rows(S, temp)
    k1 = temp**2 * kl_rows(softmax_rows(T1, temp), p_s)
    k2 = temp**2 * kl_rows(softmax_rows(T2, temp), p_s)
    got = multi_teacher_kd_loss(t(S), [t(T1), t(T2)], temp, mode=MeanKL())
    assert got.item() == pytest.approx((k1 + k2) / 2, rel=1e-6)


def test_multi_teacher_mean_prob_closed_form():
    temp = 2.0
    p1, p2 = softmax_rows(T1, temp), softmax_rows(T2, temp)
    mean = [[(a + b) / 2 for a, b in zip(r1, r2)] for r1, r2 in zip(p1, p2)]
    expected = temp**2 * kl_rows(mean, softmax_rows(S, temp))
    got = multi_teacher_kd_loss(t(S), [t(T1), t(T2)], temp, mode=MeanProb())
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Jensen: KL is convex in its first argument, so averaging targets cannot increase it.
    assert got.item() <= multi_teacher_kd_loss(t(S), [t(T1), t(T2)], temp, mode=MeanKL()).item()


def test_multi_teacher_degenerate_cases_equal_kd():
    s, te = torch.randn(3, 6), torch.randn(3, 6)
    ref = kd_loss(s, te, 3.0)
    torch.testing.assert_close(multi_teacher_kd_loss(s, [te], 3.0, mode=MeanProb()), ref)
    torch.testing.assert_close(multi_teacher_kd_loss(s, [te, te.clone(), te.clone()], 3.0, mode=MeanKL()), ref)
    torch.testing.assert_close(multi_teacher_kd_loss(s, [te, te.clone()], 3.0, mode=MeanProb()), ref)


def test_multi_teacher_validates():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="empty"):
        multi_teacher_kd_loss(s, [], 2.0)
    with pytest.raises(ValueError, match="mode"):
        multi_teacher_kd_loss(s, [s], 2.0, mode="median")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        multi_teacher_kd_loss(s, s, 2.0)  # type: ignore[arg-type]


def test_kd_objective_convention():
    ce, kd = torch.tensor(2.0), torch.tensor(10.0)
    assert kd_objective(ce, kd, 0.9).item() == pytest.approx(0.1 * 2.0 + 0.9 * 10.0)
    assert kd_objective(ce, kd, 0.0).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        kd_objective(ce, kd, 1.5)
