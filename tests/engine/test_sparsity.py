"""Group lasso: the in-place gradient equals autograd of the closed-form penalty."""
import torch
from torch import nn

from kdprune.engine import channel_groups
from kdprune.engine.sparsity import add_group_lasso_grad_, group_lasso_penalty, group_norms


class ConvBnConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = ConvBnConv()
    with torch.no_grad():
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(-0.5, 0.5)
    return m


def test_group_norm_is_the_coupled_closed_form():
    m = _model()
    g = next(g for g in channel_groups(m, torch.zeros(1, 2, 8, 8)) if g.root == "conv1")
    expected = (m.conv1.weight.pow(2).sum((1, 2, 3)) + m.bn1.weight.pow(2) + m.bn1.bias.pow(2)
                + m.conv2.weight.pow(2).sum((0, 2, 3))).sqrt()
    assert torch.allclose(group_norms(m, g), expected.detach(), atol=1e-6)


def test_in_place_grad_equals_autograd_of_penalty():
    m = _model()
    groups = channel_groups(m, torch.zeros(1, 2, 8, 8))
    group_lasso_penalty(m, groups, reg=0.3).backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    add_group_lasso_grad_(m, groups, reg=0.3)
    for n, g in ref.items():
        assert torch.allclose(dict(m.named_parameters())[n].grad, g, atol=1e-6), n
