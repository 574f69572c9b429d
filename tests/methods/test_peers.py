"""Peer recipes through torch-pruning's own pruners: targets met within 1%, the peer's pruned model
replayed by kdprune's structure log (save/load bit-exact), GroupNormPruner's regularizer in the
sparse stage."""
import pytest
import torch
import torch_pruning as tp

import kdprune as kp
from kdprune.engine import TOLERANCE
from kdprune.methods import peers
from kdprune.methods.registry import RECIPES

FT = kp.TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=2, progress=False)


def _resnet(shortcut: str = "A"):
    torch.manual_seed(0)
    return kp.create_model("resnet20", num_classes=4, in_chans=1, shortcut=shortcut)


@pytest.mark.parametrize("recipe", [
    kp.recipes.TPMagnitude(target_flops=0.5, finetune=FT),
    kp.recipes.TPMagnitude(target_params=0.25, mode=kp.engine.Global(), finetune=FT),
    kp.recipes.TPGroupNorm(target_flops=0.25, finetune=FT, sparse=FT),
])
def test_peers_meet_target_and_round_trip(recipe, toy_data, tmp_path):
    train, val = toy_data
    res = kp.compress(_resnet(), recipe, train, val, out_dir=tmp_path, latency=False, progress=False)
    metric = "flops" if recipe.target_flops else "params"
    kept = res.report["after"][metric] / res.report["before"][metric]
    assert abs(kept - recipe.target().value) <= TOLERANCE
    info = res.report["method"]["prune"]
    assert info["pruner"].startswith("torch_pruning.pruner.") and info["channels_removed"] > 0
    edits = kp.engine.get_structure(res.model).edits
    assert edits and {e["op"] for e in edits} == {"prune_channels"}
    loaded = kp.load_pruned(tmp_path / "model")
    a, b = res.model.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(res.model.eval()(x), loaded(x))


def test_pruning_is_torch_prunings_own_choice():
    """The recorded edits are exactly the groups MagnitudePruner itself prunes at that ratio."""
    model, x = _resnet("B"), torch.zeros(1, 1, 8, 8)
    recipe = kp.recipes.TPMagnitude(target_flops=0.5)
    ref = _resnet("B")
    fc = [ref.get_submodule(n) for n in peers.PeerSetup.of(ref, x).ignored]
    pruner = tp.pruner.MagnitudePruner(ref, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=0.3, max_pruning_ratio=0.9, ignored_layers=fc)
    pruner.step()
    peers.tp_prune(recipe, model, x, peers.PeerSetup.of(model, x), 0.3)
    a, b = ref.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_groupnorm_sparse_stage_calls_the_pruners_regularizer(toy_data, monkeypatch):
    calls = []
    real = tp.pruner.GroupNormPruner.regularize

    def spy(self, model, *args, **kw):
        calls.append(model)
        return real(self, model, *args, **kw)

    monkeypatch.setattr(tp.pruner.GroupNormPruner, "regularize", spy)
    train, val = toy_data
    recipe = kp.recipes.TPGroupNorm(target_flops=0.5, finetune=FT, sparse=FT, reg=1e-2)
    kp.compress(_resnet(), recipe, train, None, latency=False, progress=False)
    # one probe on a copy before training (a failing peer fails there, issue 34), then one per sparse
    # step (2 steps), none while fine-tuning
    assert len(calls) == 3 and calls[0] is not calls[1] and calls[1] is calls[2]


def test_registered_and_validated():
    assert RECIPES.get("tp-magnitude") is kp.recipes.TPMagnitude
    assert RECIPES.get("tp-groupnorm") is kp.recipes.TPGroupNorm
    with pytest.raises(ValueError, match="no minimum width"):
        kp.recipes.TPMagnitude(target_flops=0.5, min_width=4)
    with pytest.raises(ValueError, match="max_pruning_ratio"):
        kp.recipes.TPGroupNorm(target_flops=0.5, max_pruning_ratio=1.0)
    with pytest.raises(ValueError, match="Uniform"):
        kp.recipes.TPMagnitude(target_flops=0.5, mode="uniform")
    with pytest.raises(ValueError, match="FreeWidths"):  # torch-pruning has round_to only
        kp.recipes.TPMagnitude(target_flops=0.5, widths=kp.engine.RoundTo(4))


def test_a_log_that_does_not_replay_the_peer_is_refused():
    model, x = _resnet(), torch.zeros(1, 1, 8, 8)
    dense = _resnet()
    edits = peers.tp_prune(kp.recipes.TPMagnitude(target_flops=0.5), model, x, peers.PeerSetup.of(model, x), 0.3)
    peers._check_replay(dense, model, edits, x)  # the full log replays bit for bit
    with pytest.raises(ValueError, match="cannot replay"):
        peers._check_replay(dense, model, edits[:-1], x)


def test_tp_groupnorm_on_a_grouped_conv_is_a_clear_error_before_training(toy_data):
    from ..engine.constructs import ResNeXtNet
    from ..conftest import make_images

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="GroupNormPruner cannot regularise ResNeXtNet .*--method groupnorm"):
        kp.compress(ResNeXtNet(), kp.recipes.TPGroupNorm(target_flops=0.5, finetune=FT, sparse=FT),
                    make_images(32, chans=3), None, latency=False)
