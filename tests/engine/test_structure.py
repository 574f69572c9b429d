"""Structure log: JSON edits, op registry, identity_block, replay, deepcopy."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdprune.engine import (
    EDIT_OPS, FORMAT_VERSION, PruningPlan, StructureLog, apply_edit, apply_plan, get_structure,
    register_edit, replay,
)
from tests.engine.tiny_models import MiniRes, UserNet, randomize

X = torch.randn(2, 3, 16, 16)


def test_prune_edits_recorded_as_plain_json():
    m = MiniRes("B")
    apply_plan(m, X[:1], PruningPlan({"layer1.conv1": [1, 0], "stem.0": [2]}))
    log = m.kdprune_structure
    assert isinstance(log, StructureLog) and log.FORMAT_VERSION == FORMAT_VERSION == 1
    assert log.edits == [
        {"op": "prune_channels", "root": "layer1.conv1", "dim": "out", "idxs": [0, 1]},
        {"op": "prune_channels", "root": "stem.0", "dim": "out", "idxs": [2]},
    ]
    assert log.input_shape == [1, 3, 16, 16]
    d = json.loads(json.dumps(log.to_dict()))
    assert StructureLog.from_dict(d) == log
    assert "kdprune_structure" not in str(list(m.state_dict()))


def test_log_survives_deepcopy_and_is_independent():
    m = MiniRes("B")
    apply_plan(m, X[:1], PruningPlan({"layer1.conv1": [0]}))
    c = copy.deepcopy(m)
    assert c.kdprune_structure == m.kdprune_structure and c.kdprune_structure is not m.kdprune_structure
    apply_plan(c, X[:1], PruningPlan({"layer2.0.conv1": [0]}))
    assert len(c.kdprune_structure) == 2 and len(m.kdprune_structure) == 1


def test_replay_rebuilds_architecture_and_outputs():
    torch.manual_seed(0)
    m = randomize(UserNet(), X)
    apply_plan(m, X[:1], PruningPlan({"dw.0": [0, 7, 12], "stem.0": [3], "hidden": [0, 5]}))
    apply_plan(m, X[:1], PruningPlan({"dw.0": [0]}))  # a second round, renumbered channels
    fresh = replay(UserNet(), m.kdprune_structure)
    assert fresh.kdprune_structure == m.kdprune_structure
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.eval()(X), m(X))


def test_identity_block_on_resnet_block_and_replay():
    models = pytest.importorskip("kdprune.models")
    torch.manual_seed(0)
    m = randomize(models.create_model("resnet20", shortcut="B"), X)
    apply_plan(m, X[:1], PruningPlan({"layer1.0.conv1": [0, 1]}))
    apply_edit(m, {"op": "identity_block", "module": "layer2.1"}, X[:1])
    assert isinstance(m.layer2[1], nn.Identity)
    assert m.kdprune_structure.edits[-1] == {"op": "identity_block", "module": "layer2.1"}
    with torch.no_grad():  # by hand: the block is skipped entirely
        h = m.layer1(m.relu(m.bn1(m.conv1(X))))
        h = m.layer3(m.layer2[2](m.layer2[0](h)))
        expect = m.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        assert torch.equal(m(X), expect)
    fresh = replay(models.create_model("resnet20", shortcut="B"), m.kdprune_structure)
    assert isinstance(fresh.layer2[1], nn.Identity)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.eval()(X), m(X))


def test_identity_block_missing_module():
    with pytest.raises(ValueError, match="layer9"):
        apply_edit(MiniRes(), {"op": "identity_block", "module": "layer9"})


def test_custom_op_registry():
    @register_edit("test_scale_head")
    class ScaleHead:
        @staticmethod
        def apply(model, edit, example_input):
            with torch.no_grad():
                model.get_submodule(edit["module"]).weight.mul_(edit["factor"])

    try:
        m = MiniRes()
        w = m.head.weight.detach().clone()
        apply_edit(m, {"op": "test_scale_head", "module": "head", "factor": 2.0})
        assert torch.equal(m.head.weight, 2 * w)
        fresh = MiniRes()
        fresh.load_state_dict({k: v for k, v in m.state_dict().items()})
        replay(fresh, m.kdprune_structure)  # replay scales the loaded weights again
        assert torch.equal(fresh.head.weight, 4 * w)
    finally:
        EDIT_OPS._items.pop("test_scale_head")
    with pytest.raises(KeyError, match="unknown edit"):
        apply_edit(MiniRes(), {"op": "test_scale_head", "module": "head"})


def test_log_validation():
    with pytest.raises(ValueError, match="format_version 2"):
        StructureLog.from_dict({"format_version": 2, "edits": []})
    with pytest.raises(ValueError, match="'op'"):
        StructureLog([{"root": "x"}])
    with pytest.raises(TypeError, match="JSON"):
        StructureLog([{"op": "prune_channels", "idxs": torch.tensor([1])}])
    assert get_structure(MiniRes()) is None and len(get_structure(MiniRes(), create=True)) == 0


def test_input_shape_recorded_per_edit_when_it_changes():
    m = MiniRes("B")
    apply_plan(m, X[:1], PruningPlan({"layer1.conv1": [0]}))
    apply_plan(m, torch.randn(1, 3, 8, 8), PruningPlan({"layer2.0.conv1": [0]}))
    assert m.kdprune_structure.edits[1]["input_shape"] == [1, 3, 8, 8]
    fresh = replay(MiniRes("B"), m.kdprune_structure)
    assert fresh.layer2[0].conv1.out_channels == 15


def test_identity_block_refuses_a_shape_changing_block():
    models = pytest.importorskip("kdprune.models")
    m = models.create_model("resnet20", shortcut="B")
    with pytest.raises(ValueError, match="layer2.0.*only a block whose output has its input's shape"):
        apply_edit(m, {"op": "identity_block", "module": "layer2.0"}, X[:1])  # the downsampling block
    assert not isinstance(m.layer2[0], nn.Identity) and get_structure(m) is None  # untouched, not recorded
