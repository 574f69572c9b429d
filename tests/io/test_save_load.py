"""save_pruned / load_pruned: bit-exact round trips, factories, clear errors, no pickle."""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from kdprune.engine import (
    Global, MaskKind, PruningPlan, Target, apply_edit, apply_plan, attach_masks, channel_groups,
    prune_to_target,
)
from kdprune.io import load_pruned, save_pruned
from tests.engine.tiny_models import ChainNet, UserNet, make_user_net, random_plan, randomize

X = torch.randn(2, 3, 16, 16)


def assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture(scope="module")
def zoo_saved(tmp_path_factory):
    models = pytest.importorskip("kdprune.models")
    torch.manual_seed(0)
    m = randomize(models.create_model("resnet20", num_classes=7), X)
    prune_to_target(m, X[:1], Target(flops=0.6), mode=Global())
    apply_edit(m, {"op": "identity_block", "module": "layer3.2"}, X[:1])
    m.eval()
    d = save_pruned(m, tmp_path_factory.mktemp("zoo") / "r20")
    return m, d


def test_zoo_round_trip_bit_exact(zoo_saved):
    m, d = zoo_saved
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "structure.json"]  # no temp files
    loaded = load_pruned(d)
    assert not loaded.training
    assert_same_model(m, loaded, X)
    assert loaded.kdprune_structure == m.kdprune_structure
    assert loaded.kdprune_spec == {"name": "resnet20", "kwargs": {"num_classes": 7, "in_chans": 3}}
    assert isinstance(loaded.layer3[2], nn.Identity)
    rec = json.loads((d / "structure.json").read_text())
    assert rec["format_version"] == 1 and rec["model"]["name"] == "resnet20"
    assert rec["input_shape"] == [1, 3, 16, 16] and rec["edits"][-1]["op"] == "identity_block"
    assert rec["metadata"]["params"] == sum(p.numel() for p in m.parameters())
    assert len(rec["metadata"]["weights_sha256"]) == 64 and rec["kdprune_version"]


def test_load_without_pickle(zoo_saved, monkeypatch):
    m, d = zoo_saved

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    assert_same_model(m, load_pruned(d), X)


def test_user_model_factory_round_trip(tmp_path):
    m = randomize(make_user_net(), X)
    groups = channel_groups(m, X[:1])
    apply_plan(m, X[:1], random_plan(groups, seed=4))
    apply_plan(m, X[:1], random_plan(channel_groups(m, X[:1]), seed=5))  # second round, renumbered
    d = save_pruned(m.eval(), tmp_path / "user", factory=make_user_net)
    rec = json.loads((d / "structure.json").read_text())
    assert rec["model"] == {"factory": "tests.engine.tiny_models:make_user_net"}
    loaded = load_pruned(d, factory=make_user_net)
    assert_same_model(m, loaded, X)
    assert loaded.kdprune_factory is make_user_net  # re-saving needs no factory argument
    d2 = save_pruned(loaded, tmp_path / "again")
    assert json.loads((d2 / "structure.json").read_text())["model"] == rec["model"]
    with pytest.raises(ValueError, match="pass that factory"):
        load_pruned(d)


def test_factory_mismatch_warns(tmp_path):
    m = make_user_net()
    apply_plan(m, X[:1], PruningPlan({"hidden": [0]}))
    d = save_pruned(m, tmp_path / "u", factory=make_user_net)

    def other_factory():
        return UserNet()

    with pytest.warns(UserWarning, match="other_factory"):
        load_pruned(d, factory=other_factory)


def test_save_requires_spec_or_factory(tmp_path):
    with pytest.raises(ValueError, match="factory="):
        save_pruned(ChainNet(), tmp_path / "x")
    m = ChainNet()
    attach_masks(m, channel_groups(m, X[:1]))
    with pytest.raises(ValueError, match="soft masks"):
        save_pruned(m, tmp_path / "y", factory=ChainNet)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight  # shared tensor

    def forward(self, x):
        return self.b(self.a(self.conv(x).mean((2, 3))))


def test_shared_tensors(tmp_path):
    torch.manual_seed(0)
    m = Tied()
    d = save_pruned(m, tmp_path / "t", factory=Tied)
    rec = json.loads((d / "structure.json").read_text())
    assert rec["metadata"]["aliases"] == {"b.weight": "a.weight"}
    loaded = load_pruned(d, factory=Tied)
    assert loaded.a.weight is loaded.b.weight
    assert_same_model(m, loaded, X)


# ---- errors, each naming the path -------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    m = ChainNet()
    apply_plan(m, X[:1], PruningPlan({"conv2": [0, 1]}))
    return save_pruned(m, tmp_path / "chain", factory=ChainNet)


def _edit_record(d: Path, fn) -> None:
    rec = json.loads((d / "structure.json").read_text())
    fn(rec)
    (d / "structure.json").write_text(json.dumps(rec))


def test_truncated_safetensors(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        load_pruned(saved, factory=ChainNet)
    # without the checksum the safetensors parser itself must fail clearly
    _edit_record(saved, lambda r: r["metadata"].pop("weights_sha256"))
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        load_pruned(saved, factory=ChainNet)


def test_unknown_format_version(saved):
    _edit_record(saved, lambda r: r.update(format_version=99))
    with pytest.raises(ValueError, match=r"structure\.json has unknown format_version 99"):
        load_pruned(saved, factory=ChainNet)


def test_structure_from_another_model(saved):
    with pytest.raises(ValueError, match="saved from a different model"), \
            pytest.warns(UserWarning, match="factory"):
        load_pruned(saved, factory=UserNet)  # root 'conv2' does not exist in UserNet
    _edit_record(saved, lambda r: r["edits"][0].update(idxs=[0, 40]))
    with pytest.raises(ValueError, match=r"structure\.json was saved from a different model.*out of range"):
        load_pruned(saved, factory=ChainNet)


def test_weights_that_do_not_fit(saved, tmp_path):
    other = ChainNet()
    apply_plan(other, X[:1], PruningPlan({"conv2": [0, 1, 2]}))
    d2 = save_pruned(other, tmp_path / "other", factory=ChainNet)
    (saved / "model.safetensors").write_bytes((d2 / "model.safetensors").read_bytes())
    _edit_record(saved, lambda r: r["metadata"].pop("weights_sha256"))
    with pytest.raises(ValueError, match="tensor 'conv2.weight' has shape"):
        load_pruned(saved, factory=ChainNet)


@pytest.mark.parametrize("name", ["structure.json", "model.safetensors"])
def test_missing_files(saved, name):
    (saved / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        load_pruned(saved, factory=ChainNet)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pruned(tmp_path / "nowhere", factory=ChainNet)


def test_invalid_json(saved):
    (saved / "structure.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"structure\.json is not valid JSON"):
        load_pruned(saved, factory=ChainNet)


def test_resave_overwrites_atomically(saved):
    m = load_pruned(saved, factory=ChainNet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_pruned(m, saved, factory=ChainNet)
    assert sorted(p.name for p in saved.iterdir()) == ["model.safetensors", "structure.json"]
    assert_same_model(m, load_pruned(saved, factory=ChainNet), X)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prune_mask_save_load(tmp_path):
    dev = torch.device("cuda")
    x = X.to(dev)
    m = randomize(make_user_net(), X).to(dev)
    groups = channel_groups(m, x[:1])
    masks = attach_masks(m, groups, kind=MaskKind.GATE)
    for g in groups:
        masks.set_mask(g, torch.arange(g.channels) % 3 != 0)
    gated = m(x)
    from kdprune.engine import fold_gates_into_bn, masks_to_plan

    plan = masks_to_plan(masks)
    fold_gates_into_bn(m, masks)
    apply_plan(m, x[:1], plan)
    torch.testing.assert_close(m(x), gated, atol=1e-4, rtol=1e-4)
    d = save_pruned(m, tmp_path / "cuda", factory=make_user_net)
    loaded = load_pruned(d, factory=make_user_net, map_location="cuda")
    assert next(loaded.parameters()).is_cuda
    assert torch.equal(loaded(x), m(x))


def _zoo_params():
    models = pytest.importorskip("kdprune.models")
    slow = {"resnet110", "resnet50", "wrn28_10"}
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in models.list_models()]


@pytest.mark.parametrize("name", _zoo_params())
def test_every_zoo_model_round_trips(name, tmp_path):
    from kdprune.models import create_model

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32) if name in ("resnet18", "resnet50") else X
    m = randomize(create_model(name, num_classes=4), x)
    apply_plan(m, x[:1], random_plan(channel_groups(m, x[:1]), seed=2))
    assert_same_model(m, load_pruned(save_pruned(m, tmp_path / name)), x)
