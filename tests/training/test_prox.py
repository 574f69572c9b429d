"""FISTA with an L1 prox (OED's mask update): closed forms on hand-made values, the momentum
restart at a learning-rate decay, and the callback's resumable state."""
import math

import pytest
import torch
from torch import nn

from kdprune.training import LoopState
from kdprune.training.prox import FistaL1, FistaState, fista_step, soft_threshold


def test_soft_threshold_closed_form():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.2, 1.5])
    assert torch.equal(soft_threshold(x, 1.0), torch.tensor([-2.0, -0.0, 0.0, 0.0, 0.5]))


def test_fista_step_equals_closed_form():
    m0, m1 = torch.tensor([1.0, 0.5, 0.05]), torch.tensor([0.9, 0.4, 0.02])
    g, lr, lam = torch.tensor([0.2, -1.0, 0.1]), 0.1, 0.3
    st = FistaState(t=2.0, prev=m0.clone())
    out = fista_step(m1, g, st, lr, lam)
    t_next = (1 + math.sqrt(1 + 16)) / 2
    y = [m1[i].item() + (2.0 - 1) / t_next * (m1[i].item() - m0[i].item()) for i in range(3)]
    z = [yi - lr * gi for yi, gi in zip(y, g.tolist())]
    want = [max(0.0, math.copysign(max(abs(v) - lr * lam, 0.0), v)) for v in z]
    assert out.tolist() == pytest.approx(want, abs=1e-7)
    assert out[2] == 0.0  # driven to exactly zero
    assert st.t == pytest.approx(t_next) and torch.equal(st.prev, m1)


def _state(p: nn.Parameter, lr: float) -> LoopState:
    return LoopState(model=nn.Identity(), optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr),
                     epoch=0, step=0, steps_per_epoch=1, epochs=1, lr=lr)


def test_callback_steps_and_restarts_momentum_at_a_decay():
    p = nn.Parameter(torch.tensor([1.0, 0.3]))
    cb = FistaL1([p], lam=0.5)
    assert cb.owned_parameters() == [p]
    grads, lrs = [torch.tensor([0.1, 0.2]), torch.tensor([-0.2, 0.1]), torch.tensor([0.05, 0.0])], [0.1, 0.1, 0.04]
    ref, st = p.detach().clone(), FistaState(1.0, p.detach().clone())
    for i, (g, lr) in enumerate(zip(grads, lrs)):
        if i == 2:  # 0.04 <= 0.5 * 0.1: restart, the momentum term vanishes (t = 1, prev = m)
            st = FistaState(1.0, ref.clone())
        ref = fista_step(ref, g, st, lr, 0.5)
        p.grad = g.clone()
        cb.on_optimizer_step(_state(p, lr))
        assert torch.allclose(p.detach(), ref, atol=1e-7) and p.grad is None
    assert cb.restarts == 1


def test_callback_state_round_trip_resumes_identically():
    a, b = nn.Parameter(torch.tensor([0.8, 0.6])), nn.Parameter(torch.tensor([0.8, 0.6]))
    ca, cb = FistaL1([a], 0.2), FistaL1([b], 0.2)
    for g in (torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.2])):
        a.grad, b.grad = g.clone(), g.clone()
        ca.on_optimizer_step(_state(a, 0.1))
        cb.on_optimizer_step(_state(b, 0.1))
    saved = ca.state_dict()
    fresh = nn.Parameter(a.detach().clone())
    cc = FistaL1([fresh], 0.2)
    cc.load_state_dict(saved)
    g = torch.tensor([0.05, 0.05])
    b.grad, fresh.grad = g.clone(), g.clone()
    cb.on_optimizer_step(_state(b, 0.1))
    cc.on_optimizer_step(_state(fresh, 0.1))
    assert torch.equal(b.detach(), fresh.detach())


def test_callback_validates():
    with pytest.raises(ValueError, match="lam >= 0"):
        FistaL1([nn.Parameter(torch.ones(1))], lam=-1.0)


def test_per_element_lam_equals_the_closed_form_and_survives_a_round_trip():
    p = nn.Parameter(torch.tensor([0.5, 0.5, 0.5]))
    cb = FistaL1([p], lam=1.0)
    cb.set_lam(torch.tensor([0.0, 1.0, 4.0]))
    p.grad = torch.zeros(3)
    cb.on_optimizer_step(_state(p, 0.1))  # t = 1: no momentum; prox per element with tau = 0.1 * lam
    assert p.detach().tolist() == pytest.approx([0.5, 0.4, 0.1])
    fresh = FistaL1([nn.Parameter(p.detach().clone())], lam=1.0)
    fresh.load_state_dict(cb.state_dict())
    assert torch.equal(fresh.lams[0], torch.tensor([0.0, 1.0, 4.0]))
    with pytest.raises(ValueError, match="per-element lam"):
        cb.set_lam(torch.ones(2))


def test_group_prox_equals_its_closed_form_on_coupled_slices():
    from kdprune.training.prox import GroupLassoProx, GroupSlices, group_soft_threshold
    a = nn.Parameter(torch.tensor([[3.0, 0.1], [0.3, 0.1]]))  # groups over rows (dim 0) ...
    b = nn.Parameter(torch.tensor([[0.0, 12.0], [0.2, 0.0]]))  # ... coupled with b's columns (dim 1), reversed
    fam = GroupSlices((a, b), (0, 1), (torch.tensor([0, 1]), torch.tensor([1, 0])), lam=2.0)
    g0 = torch.cat([a[0].detach(), b[:, 1].detach()])  # group 0: a's row 0 with b's column 1
    g1 = torch.cat([a[1].detach(), b[:, 0].detach()])
    assert fam.norms().tolist() == pytest.approx([g0.norm().item(), g1.norm().item()])
    want0, want1 = group_soft_threshold(g0, 0.5 * 2.0), group_soft_threshold(g1, 0.5 * 2.0)
    cb = GroupLassoProx([fam])
    cb.on_optimizer_step(_state(a, 0.5))
    torch.testing.assert_close(torch.cat([a[0], b[:, 1]]).detach(), want0)
    torch.testing.assert_close(torch.cat([a[1], b[:, 0]]).detach(), want1)
    assert torch.equal(want1, torch.zeros(4)) and want0.norm() > 0  # ||g1|| = 0.37 < lr * lam = 1: exact zeros
