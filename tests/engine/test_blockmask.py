"""Scalar block masks (OED): mask 1 is the identity, folding a mask equals the masked block, a
mask-0 block removed physically equals the masked model (option A and B shortcuts, projection,
pre-activation, inverted residuals, a discovered user net), and the removal replays bit-exactly
in a fresh process."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdprune.engine import attach_block_masks, fold_block_masks, mask_sites
from kdprune.models import create_model

from .test_discover import make_user_resnet
from .tiny_models import ChainNet, randomize

ROOT = Path(__file__).resolve().parents[2]
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))

CASES = {
    "resnet20-A": lambda: create_model("resnet20", num_classes=10, in_chans=3),  # zero-pad shortcut
    "resnet20-B": lambda: create_model("resnet20", num_classes=10, in_chans=3, shortcut="B"),  # projection
    "wrn16_2": lambda: create_model("wrn16_2", num_classes=10, in_chans=3),  # pre-activation
    "mobilenetv2": lambda: create_model("mobilenetv2", num_classes=10, in_chans=3),
    "user": make_user_resnet,  # no block protocol: discovery
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(CASES[name](), X)


def _values(n: int) -> torch.Tensor:
    v = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    v[::3] = 0.0  # every third block is removed: downsampling blocks (layer2.0, ...) included
    return v


@pytest.mark.parametrize("name", sorted(CASES))
def test_masks_at_one_leave_outputs_unchanged(name):
    model = _model(name)
    with torch.no_grad():
        ref = model(X)
        hooks = attach_block_masks(model, mask_sites(model, X), lambda: torch.ones(len(hooks.sites)))
        assert torch.equal(model(X), ref)
        hooks.remove()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fold_and_remove_equal_the_masked_model(name):
    model = _model(name)
    sites = mask_sites(model, X)
    values = _values(len(sites))
    hooks = attach_block_masks(model, sites, lambda: values)
    with torch.no_grad():
        masked = model(X)
    hooks.remove()
    removed = fold_block_masks(model, sites, values, X)
    assert removed == [b for b, v in zip(sites, values.tolist()) if v == 0.0] and removed
    kinds = {type(model.get_submodule(b)).__name__ for b in removed}
    assert kinds == {"ShortcutOnly"}
    with torch.no_grad():
        torch.testing.assert_close(model(X), masked, rtol=1e-5, atol=1e-5)


def test_removal_of_downsampling_blocks_is_exact():
    # a zero mask with every other mask at 1: removal alone, no folding arithmetic
    for name, block in (("resnet20-A", "layer2.0"), ("resnet20-B", "layer3.0"), ("wrn16_2", "block2.0")):
        model = _model(name)
        sites = mask_sites(model, X)
        values = torch.tensor([0.0 if b == block else 1.0 for b in sites])
        hooks = attach_block_masks(model, sites, lambda: values)
        with torch.no_grad():
            masked = model(X)
        hooks.remove()
        fold_block_masks(model, sites, values, X)
        with torch.no_grad():
            assert torch.equal(model(X), masked), name


def test_errors_name_the_cause():
    with pytest.raises(ValueError, match="ChainNet"):
        mask_sites(ChainNet(), X)
    model = _model("resnet20-A")
    sites = mask_sites(model, X)
    with pytest.raises(ValueError, match="one non-negative mask per block"):
        fold_block_masks(model, sites, torch.ones(3), X)


def test_removal_replays_bit_exactly_in_a_fresh_process(tmp_path):
    from kdprune.io import save_pruned

    model = _model("resnet20-B")
    sites = mask_sites(model, X)
    fold_block_masks(model, sites, _values(len(sites)), X)
    save_pruned(model, tmp_path / "m")
    with torch.no_grad():
        torch.save(model(X), tmp_path / "y.pt")
    torch.save(X, tmp_path / "x.pt")
    code = ("import sys, torch, kdprune as kp; d = sys.argv[1]; torch.set_num_threads(1); "
            "m = kp.load_pruned(d + '/m').eval(); x = torch.load(d + '/x.pt')\n"
            "with torch.no_grad(): assert torch.equal(m(x), torch.load(d + '/y.pt'))\n"
            "assert type(m.get_submodule('layer1.0')).__name__ == 'ShortcutOnly'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=180, cwd=ROOT)
