"""decompose_conv / merge_conv (EDP, Ruan et al., TNNLS 2020): the block equals the conv at init,
merging is the closed-form product, a zero column of A is a removable rank, DepGraph groups the
rank at ``<name>.basis``, and decompose + prune + merge replays bit-exactly in a fresh process."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdprune.engine import (
    DecomposedConv, MaskedModelError, PruningPlan, apply_edit, apply_plan, attach_masks, channel_groups,
    decomposed_convs, decomposition_cost, merge_is_cheaper, prune_channels_edit, replay,
)
from tests.engine.tiny_models import ChainNet, GroupedNet, MiniRes, random_plan, randomize, zero_removed

X = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def _decompose(model: nn.Module, name: str, x: torch.Tensor | None = X[:1]) -> DecomposedConv:
    apply_edit(model, {"op": "decompose_conv", "module": name}, x)
    return model.get_submodule(name)


@torch.no_grad()
def _randomize_ab(block: DecomposedConv, seed: int, zero_cols: tuple[int, ...] = ()) -> None:
    """Random A (coeff) and B (basis), as after EDP training; ``zero_cols`` of A set to zero."""
    g = torch.Generator().manual_seed(seed)
    block.basis.weight.copy_(torch.randn(block.basis.weight.shape, generator=g) * 0.3)
    block.coeff.weight.copy_(torch.randn(block.coeff.weight.shape, generator=g) * 0.5)
    block.coeff.weight[:, list(zero_cols)] = 0


def _out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


CONVS = [  # (kwargs of nn.Conv2d(5, 7, ...)), input size
    ({"kernel_size": 3, "padding": 1, "bias": False}, 9),
    ({"kernel_size": 3, "padding": 1, "bias": True}, 9),
    ({"kernel_size": 3, "stride": 2, "padding": 1, "bias": True}, 9),
    ({"kernel_size": (3, 1), "stride": (2, 1), "padding": (2, 0), "dilation": 2, "bias": True}, 10),
    ({"kernel_size": 1, "bias": True}, 6),
    ({"kernel_size": 3, "padding": "same", "bias": True, "padding_mode": "reflect"}, 8),
]


@pytest.mark.parametrize("kwargs,size", CONVS)
def test_decomposed_block_equals_the_conv_at_init(kwargs, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **kwargs)
    x = torch.randn(2, 5, size, size)
    block = DecomposedConv.from_conv(conv)
    assert block.rank == block.out_channels == 7 and block.in_channels == 5 and block.basis.bias is None
    assert torch.equal(block.coeff.weight.flatten(1), torch.eye(7))
    assert (block.coeff.bias is None) == (conv.bias is None)
    with torch.no_grad():
        torch.testing.assert_close(block(x), conv(x), atol=1e-6, rtol=0)
        # merging the untouched block gives the original conv back exactly
        merged = block.to_conv()
        assert torch.equal(merged.weight, conv.weight)
        torch.testing.assert_close(merged(x), conv(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs,size", CONVS)
@pytest.mark.parametrize("rank", [3, 7, 11])
def test_merge_equals_the_two_layer_output(kwargs, size, rank):
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, **kwargs)
    block = DecomposedConv(5, 7, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           bias=conv.bias is not None, padding_mode=conv.padding_mode)
    _randomize_ab(block, seed=rank)
    x = torch.randn(2, 5, size, size)
    w, _ = block.merged_weight()
    a, b = block.coeff.weight.flatten(1), block.basis.weight
    expect_w = sum(a[:, r, None, None, None] * b[r][None] for r in range(rank))  # W'[o] = sum_r A[o,r] B[r]
    torch.testing.assert_close(w, expect_w, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(block.to_conv()(x), block(x), atol=1e-5, rtol=0)


def test_the_edits_keep_the_model_function_and_are_logged():
    model = randomize(ChainNet(), X)
    expect = _out(model)
    block = _decompose(model, "conv2")
    assert isinstance(block, DecomposedConv) and decomposed_convs(model) == ["conv2"]
    torch.testing.assert_close(_out(model), expect, atol=1e-6, rtol=0)
    _randomize_ab(block, seed=0)
    two_layer = _out(model)
    apply_edit(model, {"op": "merge_conv", "module": "conv2"}, X[:1])
    assert type(model.conv2) is nn.Conv2d and model.conv2.bias is not None
    torch.testing.assert_close(_out(model), two_layer, atol=1e-5, rtol=0)
    assert [e["op"] for e in model.kdprune_structure] == ["decompose_conv", "merge_conv"]
    assert set(model.state_dict()) == set(ChainNet().state_dict())


def test_the_rank_is_a_channel_group_rooted_at_the_basis():
    model = randomize(MiniRes("B"), X)
    for name in ("layer1.conv2", "layer2.0.conv1"):  # feeds a residual add / a plain BN
        _decompose(model, name)
    groups = {g.root: g for g in channel_groups(model, X[:1])}
    for name in ("layer1.conv2", "layer2.0.conv1"):
        rank = groups[f"{name}.basis"]
        assert rank.channels == model.get_submodule(name).rank
        assert {(m.name, m.role) for m in rank.members} == {(f"{name}.basis", "out"), (f"{name}.coeff", "in")}
        assert rank.sites == (f"{name}.basis",)
    # coeff's outputs are the original conv's: coupled to its BN (and the residual stream)
    assert groups["layer2.0.conv1.coeff"].sites == ("layer2.0.bn1",)
    assert any(m.name == "layer1.conv2.coeff" for g in groups.values() for m in g.members if m.role == "out")


@pytest.mark.parametrize("seed", [0, 1])
def test_random_plans_on_decomposed_models_equal_zeroing(seed):
    model = randomize(MiniRes("B"), X, seed)
    for name in ("stem.0", "layer1.conv2", "layer2.0.conv1", "layer2.1.conv2"):
        _randomize_ab(_decompose(model, name), seed)
    model = randomize(model, X, seed)  # recalibrate BN after the random A, B
    groups = channel_groups(model, X[:1])
    plan = random_plan(groups, seed)
    assert any(plan[g.root] for g in groups if g.root.endswith(".basis"))
    ref = zero_removed(model, groups, plan)
    apply_plan(model, X[:1], plan)
    expect = _out(ref)
    torch.testing.assert_close(_out(model), expect, atol=1e-5 * max(1.0, expect.abs().max().item()), rtol=0)


def test_a_zero_column_of_a_is_a_removable_rank_then_merge():
    model = randomize(ChainNet(), X)
    block = _decompose(model, "conv2")
    cols = (1, 4, 7)
    _randomize_ab(block, seed=3, zero_cols=cols)
    assert torch.linalg.matrix_rank(block.coeff.weight.flatten(1)).item() == 12 - len(cols)
    expect = _out(model)
    apply_edit(model, prune_channels_edit("conv2.basis", cols), X[:1])
    block = model.conv2
    assert block.rank == block.basis.out_channels == block.coeff.in_channels == 9
    assert block.out_channels == 12 and model.conv3.in_channels == 12
    torch.testing.assert_close(_out(model), expect, atol=1e-6, rtol=0)
    apply_edit(model, {"op": "merge_conv", "module": "conv2"}, X[:1])
    assert model.conv2.weight.shape == (12, 8, 3, 3)
    assert torch.linalg.matrix_rank(model.conv2.weight.flatten(1)).item() <= 9
    torch.testing.assert_close(_out(model), expect, atol=1e-5, rtol=0)
    assert [e["op"] for e in model.kdprune_structure] == ["decompose_conv", "prune_channels", "merge_conv"]


def _edited_zoo_model() -> tuple[nn.Module, torch.Tensor]:
    models = pytest.importorskip("kdprune.models")
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = randomize(models.create_model("resnet20", num_classes=10, in_chans=1, shortcut="B"), x)
    for i, name in enumerate(("layer1.0.conv1", "layer2.1.conv2", "layer3.0.conv1")):
        _randomize_ab(_decompose(model, name, x[:1]), seed=i, zero_cols=(0, 2))
    groups = {g.root for g in channel_groups(model, x[:1])}
    plan = {r: [0, 2] for r in ("layer1.0.conv1.basis", "layer2.1.conv2.basis", "layer3.0.conv1.basis")}
    plan["layer1.0.conv1.coeff"] = [1, 5, 6]  # the original conv's output channels (+ bn1, conv2 in)
    assert set(plan) <= groups
    apply_plan(model, x[:1], PruningPlan(plan))
    apply_edit(model, {"op": "merge_conv", "module": "layer1.0.conv1"}, x[:1])
    return model, x


def test_decompose_prune_merge_replays_bit_exactly_in_a_fresh_process(tmp_path):
    from kdprune.io import load_pruned, save_pruned

    model, x = _edited_zoo_model()
    assert decomposed_convs(model) == ["layer2.1.conv2", "layer3.0.conv1"]
    assert model.get_submodule("layer1.0.conv1").weight.shape == (13, 16, 3, 3)
    ops = [e["op"] for e in model.kdprune_structure]
    assert ops == ["decompose_conv"] * 3 + ["prune_channels"] * 4 + ["merge_conv"]
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")  # in-process replay too
    assert torch.equal(_out(again, x), _out(model, x))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, kdprune as kp; from safetensors.torch import save_file; d = sys.argv[1]; "
            "m = kp.load_pruned(d + '/m'); x = torch.load(d + '/x.pt');"
            "save_file({'y': m(x).detach()}, d + '/y.safetensors')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=120)
    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], _out(model, x))


def test_replay_rebuilds_the_decomposed_architecture():
    model = randomize(ChainNet(), X)
    _randomize_ab(_decompose(model, "conv2"), seed=0, zero_cols=(3,))
    apply_edit(model, prune_channels_edit("conv2.basis", [3]), X[:1])
    fresh = replay(ChainNet(), model.kdprune_structure)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_out(fresh), _out(model))


@pytest.mark.parametrize("rank,cheaper", [(12, True), (11, True), (10, False), (1, False)])
def test_merge_rule_by_flops(rank, cheaper):
    block = DecomposedConv(8, 12, rank, 3, padding=1)
    cost = decomposition_cost(block, output_hw=(5, 4))
    # r (k^2 C_in + C_out) vs k^2 C_in C_out = 864: the break-even rank is 864 / 84 = 10.3
    assert (cost.decomposed_params, cost.merged_params) == (rank * 84, 864)
    assert (cost.decomposed_macs, cost.merged_macs) == (rank * 84 * 20, 864 * 20)
    assert merge_is_cheaper(block) is cheaper is cost.merge_is_cheaper
    complexity = pytest.importorskip("kdprune.metrics").complexity
    x = torch.randn(1, 8, 5, 4)
    assert complexity(block, example_input=x).macs == cost.decomposed_macs
    assert complexity(block.to_conv(), example_input=x).macs == cost.merged_macs


def test_bad_targets_are_refused_clearly():
    model = GroupedNet()
    x = X[:1]
    with pytest.raises(ValueError, match=r"'g\.0' is a grouped conv \(groups=2\)"):
        apply_edit(model, {"op": "decompose_conv", "module": "g.0"}, x)
    with pytest.raises(ValueError, match=r"'fc' is a Linear, not an nn.Conv2d"):
        apply_edit(model, {"op": "decompose_conv", "module": "fc"}, x)
    with pytest.raises(ValueError, match=r"'a\.0' is a Conv2d, not a DecomposedConv"):
        apply_edit(model, {"op": "merge_conv", "module": "a.0"}, x)
    with pytest.raises(ValueError, match="'nope' not found"):
        apply_edit(model, {"op": "decompose_conv", "module": "nope"}, x)
    with pytest.raises(ValueError, match="needs a 'module' name"):
        apply_edit(model, {"op": "merge_conv"}, x)
    _decompose(model, "a.0", x)
    with pytest.raises(ValueError, match="already a DecomposedConv"):
        apply_edit(model, {"op": "decompose_conv", "module": "a.0"}, x)
    assert [e["op"] for e in model.kdprune_structure] == ["decompose_conv"]  # refusals are not logged


def test_unreproducible_replacements_and_unused_convs_are_refused(monkeypatch):
    class StdConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    net = nn.Sequential(StdConv(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="overrides the conv forward"):
        apply_edit(net, {"op": "decompose_conv", "module": "0"}, X[:1])
    model = randomize(ChainNet(), X)
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="'unused' did not run on the example input"):
        apply_edit(model, {"op": "decompose_conv", "module": "unused"}, X[:1])
    block = _decompose(model, "conv2")
    broken = DecomposedConv.to_conv

    def wrong(self):  # a merge with a shifted bias must be caught by the forward check
        conv = broken(self)
        conv.bias.data.add_(1.0)
        return conv

    monkeypatch.setattr(DecomposedConv, "to_conv", wrong)
    with pytest.raises(ValueError, match="does not reproduce its output.*left unchanged"):
        apply_edit(model, {"op": "merge_conv", "module": "conv2"}, X[:1])
    assert model.conv2 is block and len(model.kdprune_structure) == 1


def test_masked_models_are_refused_and_modes_are_kept():
    model = randomize(ChainNet(), X)
    masks = attach_masks(model, channel_groups(model, X[:1]))
    with pytest.raises(MaskedModelError, match="soft masks attached"):
        apply_edit(model, {"op": "decompose_conv", "module": "conv2"}, X[:1])
    masks.remove()
    model.train()
    block = _decompose(copy.deepcopy(model), "conv2").double()
    assert block.training and block.basis.weight.dtype == torch.float64
    assert DecomposedConv.from_conv(nn.Conv2d(2, 3, 1).double().eval()).coeff.weight.dtype == torch.float64
    assert not DecomposedConv.from_conv(nn.Conv2d(2, 3, 1).eval()).training
