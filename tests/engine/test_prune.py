"""Physical removal == dense model with the removed channels zeroed (eval mode)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdprune.engine import (
    MaskedModelError, PruningPlan, apply_plan, attach_masks, channel_groups, get_structure,
)
from tests.engine.tiny_models import (
    ChainNet, DualPath, GroupedNet, MiniRes, UserNet, WideNet, random_plan, randomize, zero_removed,
)

TINY = {
    "chain": ChainNet, "res_a": lambda: MiniRes("A"), "res_b": lambda: MiniRes("B"),
    "user": UserNet, "grouped": GroupedNet, "wide": lambda: WideNet(16, 3), "dual_path": DualPath,
}


def _width(module: nn.Module) -> int:
    for attr in ("out_channels", "num_features", "out_features"):
        if hasattr(module, attr):
            return getattr(module, attr)
    raise AssertionError(module)


def check_prune_equivalence(model: nn.Module, x: torch.Tensor, seed: int, atol: float = 1e-5) -> None:
    """Random plan: pruned outputs == zeroed dense outputs; widths shrink exactly as planned."""
    randomize(model, x, seed)
    groups = channel_groups(model, x[:1])
    plan = random_plan(groups, seed)
    ref = zero_removed(model, groups, plan)
    before = {mm.name: _width(model.get_submodule(mm.name))
              for g in groups for mm in g.producers}
    n_out = model(x).shape
    apply_plan(model, x[:1], plan)
    with torch.no_grad():
        expect, got = ref(x), model(x)
    assert got.shape == n_out  # classifier output unchanged
    scale = max(1.0, expect.abs().max().item())  # deep random nets have large logits
    torch.testing.assert_close(got, expect, atol=atol * scale, rtol=0)
    removed_per_member: dict[str, int] = {}
    for g in groups:
        gone = set(plan.removals.get(g.root, ()))
        for mm in g.producers:
            removed_per_member[mm.name] = removed_per_member.get(mm.name, 0) + sum(
                r in gone for r in mm.root_idxs)
    for name, n in removed_per_member.items():
        assert _width(model.get_submodule(name)) == before[name] - n, name
    log = get_structure(model)  # created on the first edit only
    edits = log.edits if log is not None else []
    assert [e["root"] for e in edits] == [r for r, i in plan.items() if i]


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_models_random_plans(name, seed):
    check_prune_equivalence(TINY[name](), torch.randn(4, 3, 16, 16), seed)


def test_hand_zeroing_matches_for_chain():
    """Independent of group metadata: zero conv2 channel 3 (no BN) and bn1 channel 0 by hand."""
    m = randomize(ChainNet(), torch.randn(1, 3, 8, 8))
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.bn1.weight[0] = ref.bn1.bias[0] = 0
        ref.conv2.weight[3] = 0
        ref.conv2.bias[3] = 0
    x = torch.randn(3, 3, 8, 8)
    apply_plan(m, x[:1], PruningPlan({"conv1": [0], "conv2": [3]}))
    assert m.conv1.weight.shape == (7, 3, 3, 3) and m.bn1.num_features == 7
    assert m.conv2.weight.shape == (11, 7, 3, 3) and m.conv3.weight.shape == (16, 11, 3, 3)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=0)


def test_apply_plan_errors():
    x = torch.randn(1, 3, 8, 8)
    m = ChainNet()
    with pytest.raises(ValueError, match="not found"):
        apply_plan(m, x, PruningPlan({"missing.conv": [0]}))
    with pytest.raises(ValueError, match="out of range"):
        apply_plan(m, x, PruningPlan({"conv1": [8]}))
    with pytest.raises(ValueError, match="all 8 channels"):
        apply_plan(m, x, PruningPlan({"conv1": list(range(8))}))
    r = MiniRes("B")
    with pytest.raises(ValueError, match="already pruned"):  # two roots of one coupled group
        apply_plan(r, x, PruningPlan({"stem.0": [0], "layer1.conv2": [1]}))
    a = MiniRes("A")
    with pytest.raises(ValueError, match="barrier"):
        apply_plan(a, x, PruningPlan({"stem.0": [0]}))
    attach_masks(m, channel_groups(m, x))
    with pytest.raises(MaskedModelError):
        apply_plan(m, x, PruningPlan({"conv1": [0]}))


def _zoo_names() -> list:
    models = pytest.importorskip("kdprune.models")
    slow = {"resnet110", "resnet50", "wrn28_10"}  # the big/deep ones (seconds each)
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in models.list_models()]


def _zoo_input(name: str) -> torch.Tensor:
    size = 32 if name in ("resnet18", "resnet50") else 16  # ImageNet stems downsample 32x
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", _zoo_names())
def test_zoo_models_random_plan(name):
    from kdprune.models import create_model

    torch.manual_seed(0)
    check_prune_equivalence(create_model(name), _zoo_input(name), seed=3)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_zoo_resnet_shortcut_options(shortcut):
    from kdprune.models import create_model

    torch.manual_seed(0)
    check_prune_equivalence(create_model("resnet20", shortcut=shortcut), _zoo_input("resnet20"), 5)
