"""Parameter groups: weight decay only on conv/linear weights unless asked; owned parameters
stay out of the optimizer."""
import pytest
import torch
from torch import nn

from kdprune.training import Callback, TrainConfig, train
from kdprune.training.config import SGD, Constant
from kdprune.training.params import param_groups

from ..conftest import TinyNet


class _Gated(nn.Module):
    """A conv with a per-channel gate (1-D) and a 2-D parameter it asks not to decay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Parameter(torch.ones(4))
        self.table = nn.Parameter(torch.ones(2, 2))
        self.fc = nn.Linear(4, 4)

    def no_weight_decay(self):
        return {"table"}

    def forward(self, x):
        h = self.bn(self.conv(x)) * self.gate.view(1, -1, 1, 1)
        return self.fc(h.mean((2, 3))) + self.table.sum() * 0


def _ids(group):
    return {id(p) for p in group["params"]}


def test_default_groups_decay_only_weights():
    m = _Gated()
    groups = {g["name"]: g for g in param_groups({"": m})}
    assert _ids(groups["decay"]) == {id(m.conv.weight), id(m.fc.weight)}
    no_decay = (m.conv.bias, m.bn.weight, m.bn.bias, m.gate, m.table, m.fc.bias)
    assert _ids(groups["no_decay"]) == {id(p) for p in no_decay}
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_decay_1d_and_owned_and_shared():
    m = _Gated()
    (only,) = param_groups({"": m, "again": m.fc}, owned=[m.gate], decay_1d=True)  # fc shared: once
    assert _ids(only) == {id(p) for p in m.parameters()} - {id(m.gate)}
    assert len(only["params"]) == len(list(m.parameters())) - 1


class _ZeroGrads(Callback):
    """Leaves weight decay as the only force on the parameters."""

    def on_after_backward(self, state):
        for p in state.model.parameters():
            p.grad = torch.zeros_like(p)


@pytest.mark.parametrize("decay_1d", [False, True])
def test_weight_decay_lands_only_where_asked(toy_data, decay_1d):
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # BN affine starts at 1/0: make every parameter non-zero
        for p in model.parameters():
            p.add_(0.5)
    before = {k: v.clone() for k, v in model.named_parameters()}
    lr, wd, steps = 0.1, 0.01, 3
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer=SGD(lr=lr, momentum=0.0, weight_decay=wd),
                      schedule=Constant(), max_steps_per_epoch=steps, progress=False, weight_decay_1d=decay_1d)
    train(model, toy_data[0], None, cfg, callbacks=[_ZeroGrads()])
    for k, p in model.named_parameters():
        decayed = decay_1d or p.ndim > 1
        expect = before[k] * (1 - lr * wd) ** steps if decayed else before[k]
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-7, msg=k)
