"""fold_bn: eval-mode equivalence on zoo, pruned and hand-made nets; only exclusive conv -> BN pairs fold."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kdprune as kp
from kdprune.engine import Global, Target, prune_to_target
from kdprune.io import find_conv_bn_pairs, fold_bn, load_pruned, save_pruned
from tests.engine.tiny_models import randomize

X28 = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _bns(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_equivalent(a: nn.Module, b: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    assert ya.shape == yb.shape
    assert (ya - yb).abs().max().item() <= atol


def test_resnet20_every_bn_folds_and_the_input_is_untouched():
    torch.manual_seed(0)
    model = randomize(kp.create_model("resnet20", num_classes=10, in_chans=1), X28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = kp.fold_bn(model)
    assert _bns(folded) == [] and len(folded.kdprune_folded_bn) == len(_bns(model)) == 19
    assert ("layer1.0.conv1", "layer1.0.bn1") in folded.kdprune_folded_bn
    assert isinstance(folded.layer1[0].bn1, nn.Identity) and folded.layer1[0].conv1.bias is not None
    assert_equivalent(model, folded, X28)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a copy: the source keeps its BNs
    assert len(_bns(model)) == 19 and model.layer1[0].conv1.bias is None


def test_pruned_model_loaded_from_disk(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    model = randomize(kp.create_model("resnet20", num_classes=10, in_chans=1), x)
    prune_to_target(model, x[:1], Target(flops=0.5), mode=Global())
    loaded = load_pruned(save_pruned(randomize(model, x, seed=3), tmp_path / "p"))
    folded = fold_bn(loaded)
    assert _bns(folded) == [] and folded.layer1[0].conv1.out_channels < 16  # the pruned widths stay
    assert_equivalent(loaded, folded, x)
    with pytest.raises(ValueError, match="BatchNorm folded"):
        save_pruned(folded, tmp_path / "f")


class HandMade(nn.Module):
    """Grouped and depthwise convs, a conv with bias, and two BNs that must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn0 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.shared = nn.Conv2d(16, 16, 1, bias=False)  # its output also feeds the skip below
        self.bn3 = nn.BatchNorm2d(16)
        self.bn_after_add = nn.BatchNorm2d(16)  # reads an add, not a conv
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.grouped(x))))))
        y = self.shared(x)
        x = self.bn_after_add(self.bn3(y) + y)
        return self.head(x.mean((2, 3)))


def test_hand_made_net_folds_only_exclusive_pairs():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 12, 12)
    model = randomize(HandMade(), x)
    assert find_conv_bn_pairs(model) == [("stem", "bn0"), ("grouped", "bn1"), ("dw", "bn2")]
    folded = fold_bn(model)
    assert _bns(folded) == ["bn3", "bn_after_add"]
    assert folded.shared.bias is None  # not folded: bn3's input is also used by the add
    assert folded.dw.bias is not None and folded.grouped.bias is not None
    assert_equivalent(model, folded, x)


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it), plus a conv output used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if x.sum() > 0:  # data-dependent: fx raises, autograd pairing still works
            x = x * 2
        y = self.conv2(x)
        return (self.bn2(y) + y).flatten(1)


def test_untraceable_model_needs_an_example_and_folds_by_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = randomize(Untraceable(), x)
    with pytest.raises(ValueError, match="pass example_input"):
        fold_bn(model)
    folded = fold_bn(model, example_input=x)
    assert folded.kdprune_folded_bn == [("conv", "bn")]  # conv2's output also feeds the add
    assert _bns(folded) == ["bn2"]
    assert_equivalent(model, folded, x)
    assert_equivalent(model, folded, -x)  # the other branch too


def test_hooked_bn_is_left_alone_and_training_mode_does_not_matter():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    model = randomize(HandMade(), x).train()
    model.bn1.register_forward_hook(lambda m, i, o: o * 0.5)
    folded = fold_bn(model)
    assert "bn1" in _bns(folded) and not folded.training and model.training
    assert_equivalent(model, folded, x)


class MaskedByConv(Untraceable):
    """Reads conv's output through a comparison, which autograd does not record: folding is unsafe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return (self.bn(y) * (y > 0.1).float()).flatten(1)


def test_autograd_fallback_checks_its_result():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    model = randomize(MaskedByConv(), x)
    with pytest.raises(ValueError, match="outside autograd"):
        fold_bn(model, example_input=x)
