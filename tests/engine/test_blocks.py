"""remove_block: a removed residual block equals the block with its branch zeroed; it replays in a
fresh process; blocks without the protocol get a clear error."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdprune.engine import ShortcutOnly, apply_edit, residual_blocks

from .tiny_models import ChainNet, randomize

X = torch.randn(3, 1, 28, 28)


def _zoo(shortcut: str) -> nn.Module:
    models = pytest.importorskip("kdprune.models")
    torch.manual_seed(0)
    return randomize(models.create_model("resnet20", num_classes=10, in_chans=1, shortcut=shortcut), X)


def _masked(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Output with each named block's branch multiplied by 0 (its bn2 output), as a zero mask does."""
    hooks = [model.get_submodule(f"{n}.bn2").register_forward_hook(lambda m, a, out: out * 0.0) for n in names]
    try:
        with torch.no_grad():
            return model.eval()(X)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("names", [["layer1.1"], ["layer2.0"], ["layer1.2", "layer2.0", "layer3.0", "layer3.2"]])
def test_removed_block_equals_the_zero_masked_block(shortcut, names):
    model = _zoo(shortcut)  # layer2.0 / layer3.0 downsample: pad (A) or projection (B) shortcut
    expect = _masked(model, names)
    for n in names:
        apply_edit(model, {"op": "remove_block", "module": n}, X[:1])
        assert isinstance(model.get_submodule(n), ShortcutOnly)
    with torch.no_grad():
        assert torch.equal(model.eval()(X), expect)
    assert [e["module"] for e in model.kdprune_structure.edits] == names


def test_block_removal_replays_bit_exactly_in_a_fresh_process(tmp_path):
    from kdprune.io import save_pruned

    model = _zoo("B")
    for n in ("layer1.1", "layer2.0"):
        apply_edit(model, {"op": "remove_block", "module": n}, X[:1])
    save_pruned(model, tmp_path / "m")
    torch.save(X, tmp_path / "x.pt")
    code = ("import sys, torch, kdprune as kp; from safetensors.torch import save_file; d = sys.argv[1]; "
            "m = kp.load_pruned(d + '/m'); x = torch.load(d + '/x.pt');"
            "save_file({'y': m(x).detach()}, d + '/y.safetensors')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=120)
    with torch.no_grad():
        assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], model.eval()(X))


def test_blocks_without_the_protocol_are_refused_clearly():
    with pytest.raises(ValueError, match="does not list its residual blocks"):
        residual_blocks(ChainNet())
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3)))
    with pytest.raises(ValueError, match="no residual_parts.*cannot tell its shortcut from its branch"):
        apply_edit(net, {"op": "remove_block", "module": "1"})
    assert residual_blocks(_zoo("A"))[::3] == ["layer1.0", "layer2.0", "layer3.0"]


# (model name, kwargs, branch-end submodule inside a block): zeroing that output zeroes the branch
ZOO = [("resnet20", {"shortcut": "A"}, "bn2"), ("wrn16_2", {}, "conv2"), ("resnet18", {}, "bn2"),
       ("resnet50", {}, "bn3"), ("mobilenetv2", {}, "conv")]
X3 = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name,kwargs,branch_end", ZOO)
def test_every_zoo_family_removes_its_blocks_exactly(name, kwargs, branch_end):
    models = pytest.importorskip("kdprune.models")
    torch.manual_seed(0)
    model = randomize(models.create_model(name, num_classes=10, in_chans=3, **kwargs), X3)
    blocks = residual_blocks(model)
    assert blocks, name
    changes = [b for b in blocks if model.get_submodule(b).residual_parts()["shortcut"] is not None]
    chosen = sorted({blocks[0], blocks[-1], *changes[:1]}, key=blocks.index)  # incl. a projection block
    hooks = [model.get_submodule(f"{b}.{branch_end}").register_forward_hook(lambda m, a, out: out * 0.0)
             for b in chosen]
    with torch.no_grad():
        expect = model.eval()(X3)
    for h in hooks:
        h.remove()
    for b in chosen:
        apply_edit(model, {"op": "remove_block", "module": b}, X3[:1])
    with torch.no_grad():
        assert torch.equal(model.eval()(X3), expect)


def test_a_block_without_a_residual_connection_is_refused():
    models = pytest.importorskip("kdprune.models")
    m = models.create_model("mobilenetv2", num_classes=10, in_chans=3)
    plain = next(n for n, b in m.named_modules() if type(b).__name__ == "InvertedResidual" and not b.use_res)
    assert plain not in residual_blocks(m)
    with pytest.raises(ValueError, match="has no residual connection"):
        apply_edit(m, {"op": "remove_block", "module": plain})
