"""FeatureTap captures the right tensors; HintLoss (FitNets) maths and shape handling."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.distill import FeatureTap, HintLoss


def net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def test_feature_tap_matches_manual_forward():
    torch.manual_seed(0)
    m = net()
    x = torch.randn(2, 2, 8, 8)
    h1 = m[1](m[0](x))
    h3 = m[3](m[2](h1))
    with FeatureTap(m, ["1", "3"]) as tap:
        out = m(x)
        torch.testing.assert_close(tap["1"], h1)
        torch.testing.assert_close(tap["3"], h3)
        assert list(tap.features) == ["1", "3"]
        assert tap.as_list()[1].shape == (2, 6, 4, 4)
        assert tap["3"].requires_grad  # not detached by default: hints can backprop
        tap.clear()
        assert tap.features == {}
    torch.testing.assert_close(out, m(x))
    assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(not sub._forward_hooks for sub in m.modules())


def test_feature_tap_overwrites_per_forward_and_detach():
    m = net()
    tap = FeatureTap(m, ["0"], detach=True)
    m(torch.zeros(1, 2, 4, 4))
    first = tap["0"]
    x = torch.randn(1, 2, 4, 4)
    m(x)
    assert not tap["0"].requires_grad
    torch.testing.assert_close(tap["0"], m[0](x).detach())
    assert not torch.equal(first, tap["0"])
    tap.remove()
    tap.remove()  # idempotent
    m(x)
    with pytest.raises(KeyError):
        tap["0"]


def test_feature_tap_unknown_name_lists_available():
    m = net()
    with pytest.raises(KeyError, match=r"'9'.*Available: 0, 1, 2"):
        FeatureTap(m, ["1", "9"])
    # Validation happens before hooking: no hook was left behind by the failed tap.
    assert all(not sub._forward_hooks for sub in m.modules())


def test_hint_loss_zero_for_identity_and_equal_features():
    f = torch.randn(2, 5, 4, 4)
    hint = HintLoss([5], [5], init="identity")
    assert hint([f], [f.clone()]).item() == pytest.approx(0.0, abs=1e-12)


def test_hint_loss_value_and_gradients():
    torch.manual_seed(0)
    hint = HintLoss([3, 4], [5, 2])
    s1, t1 = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 5, 4, 4, requires_grad=True)
    s2, t2 = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 2, 4, 4)
    loss = hint([s1, s2], {"a": t1, "b": t2})
    a0, a1 = hint.adapters
    expected = (F.mse_loss(a0(s1), t1) + F.mse_loss(a1(F.adaptive_avg_pool2d(s2, 4)), t2)) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s1.grad is not None and a0.weight.grad is not None
    assert t1.grad is None  # teacher features are targets, never trained


def test_hint_loss_pools_larger_map_either_side_and_pooled_features():
    hint = HintLoss([3, 4, 6], [3, 4, 6], init="identity")
    t_big = torch.randn(1, 3, 8, 8)
    s_small = F.adaptive_avg_pool2d(t_big, 2)
    s_big = torch.randn(1, 4, 6, 6)
    t_small = F.adaptive_avg_pool2d(s_big, 3)
    v = torch.randn(2, 6)
    loss = hint([s_small, s_big, v], [t_big, t_small, v.clone()])
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_hint_loss_rectangular_identity_and_errors():
    hint = HintLoss([4], [2], init="identity")
    s = torch.randn(1, 4, 3, 3)
    assert hint([s], [s[:, :2]]).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="after pruning"):
        hint([torch.randn(1, 3, 3, 3)], [torch.randn(1, 2, 3, 3)])
    with pytest.raises(ValueError):
        hint([s, s], [s, s])
    with pytest.raises(ValueError):
        HintLoss([1, 2], [1])
