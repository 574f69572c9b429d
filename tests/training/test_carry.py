"""Optimizer state carried between stages: a run split in two windows with the state carried
equals one uninterrupted run (momentum and Adam moments included), and the state is cut to the
entries an edit kept."""
import pytest
import torch

from kdprune.training import (
    CarryOptimizerState,
    TrainConfig,
    load_named_state,
    named_optimizer_state,
    slice_state,
    train,
)
from kdprune.training.config import SGD, Adam, Cosine

from .helpers import PlainNet


def _run(train_set, opt, split: bool, carry: bool) -> PlainNet:
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer=opt, schedule=Cosine(), progress=False, seed=1)
    torch.manual_seed(0)
    model = PlainNet()
    if not split:
        train(model, train_set, None, cfg)
        return model
    cb = CarryOptimizerState()
    train(model, train_set, None, cfg.window(0, 1), callbacks=[cb])
    if carry:
        cb.hold()
    train(model, train_set, None, cfg.window(1, 2), callbacks=[cb])
    assert cb.carried == ([len(list(model.parameters()))] if carry else [])
    return model


@pytest.mark.parametrize("opt", [SGD(lr=0.05, momentum=0.9, weight_decay=5e-4), Adam(lr=1e-2)],
                         ids=["sgd-momentum", "adam"])
def test_two_windows_with_the_state_carried_equal_one_run(toy_data, opt):
    ref = _run(toy_data[0], opt, split=False, carry=False)
    carried = _run(toy_data[0], opt, split=True, carry=True)
    fresh = _run(toy_data[0], opt, split=True, carry=False)
    for (k, a), b, c in zip(ref.state_dict().items(), carried.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert any(not torch.equal(a, c) for a, c in zip(ref.state_dict().values(), fresh.state_dict().values()))


def test_slice_state_cuts_tensors_to_the_kept_entries_and_keeps_scalars():
    m, v = torch.arange(24.0).view(4, 3, 2), torch.arange(4.0)
    state = {"conv.weight": {"exp_avg": m, "exp_avg_sq": m * 2, "step": torch.tensor(7.0)},
             "bn.weight": {"momentum_buffer": v}, "fc.bias": {"momentum_buffer": v + 1}}
    kept = {"conv.weight": (torch.tensor([0, 3]), torch.tensor([2])), "bn.weight": (torch.tensor([1, 2]),)}
    out = slice_state(state, kept)
    assert torch.equal(out["conv.weight"]["exp_avg"], m[[0, 3]][:, [2]])
    assert torch.equal(out["conv.weight"]["exp_avg_sq"], 2 * m[[0, 3]][:, [2]])
    assert torch.equal(out["conv.weight"]["step"], torch.tensor(7.0))
    assert torch.equal(out["bn.weight"]["momentum_buffer"], v[[1, 2]])
    assert torch.equal(out["fc.bias"]["momentum_buffer"], v + 1)  # not in kept: whole


def test_state_goes_to_parameters_of_the_same_name_and_shape_only():
    torch.manual_seed(0)
    a, b = PlainNet(), PlainNet(width=4)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    a(torch.randn(2, 1, 8, 8)).sum().backward()
    opt_a.step()
    held = named_optimizer_state(a, opt_a)
    assert set(held) == {n for n, _ in a.named_parameters()}
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    assert load_named_state(b, opt_b, held) == 1  # fc.bias: 4 classes in both; the rest are narrower
    assert torch.equal(opt_b.state[b.fc.bias]["momentum_buffer"], held["fc.bias"]["momentum_buffer"])
    assert b.fc.weight not in opt_b.state


def test_hold_before_any_stage_is_an_error():
    with pytest.raises(RuntimeError, match="no stage has trained"):
        CarryOptimizerState().hold()
