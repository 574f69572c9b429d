"""Convs whose forward transforms their weight (engine/fold.py): folded into the plain conv they
run before a cut, exactly, in place; anything else is left as it is."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdprune.engine.fold import fold_weight_transform, transforms_weight

from .constructs_split import StdConv2d


class Doubled(nn.Conv2d):
    """Not a weight transform: it scales its input (the plain conv on the captured weight differs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2 * x)


class NormedLinear(nn.Linear):
    """A per-row weight norm on a linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


def test_a_weight_standardised_conv_folds_into_the_conv_it_runs():
    torch.manual_seed(0)
    conv, x = StdConv2d(4, 6, 3, padding=1, groups=2), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = conv(x)
    assert transforms_weight(conv) and fold_weight_transform(conv)
    assert type(conv) is nn.Conv2d and not transforms_weight(conv)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-6)
    assert not fold_weight_transform(conv)  # a plain conv: nothing to do


def test_a_normed_linear_folds_and_an_input_transform_does_not():
    torch.manual_seed(0)
    lin, x = NormedLinear(5, 3), torch.randn(4, 5)
    with torch.no_grad():
        want = lin(x)
    assert fold_weight_transform(lin) and type(lin) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-6)
    doubled = Doubled(3, 4, 3)
    before = doubled.weight.detach().clone()
    assert not fold_weight_transform(doubled)
    assert type(doubled) is Doubled and torch.equal(doubled.weight, before)
