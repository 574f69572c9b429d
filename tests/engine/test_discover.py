"""Residual block discovery on user nets without the block protocol: every found block removes to
exactly the block with its branch zeroed and replays from the log (in a fresh process too);
non-removable sums are not listed; zoo models give their protocol's answer."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import kdprune.engine.blocks as blocks_mod
from kdprune.engine import (
    ShortcutOnly,
    apply_edit,
    discover_blocks,
    residual_blocks,
    scan_blocks,
)

from .tiny_models import randomize

X = torch.randn(2, 3, 16, 16)
ROOT = Path(__file__).resolve().parents[2]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    """torchvision-style: one shared ReLU module, ``out += identity``, projection ``downsample``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class FunctionalBasic(nn.Module):
    """kuangliu-style: empty-Sequential identity shortcut, ``F.relu(out + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreAct(nn.Module):
    """Pre-activation block; the projection reads the activated input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(pre)
        return self.conv2(self.act2(self.bn2(self.conv1(pre)))) + sc


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck summed with ``torch.add``, then an in-place ReLU module."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = 4 * planes
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(planes), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.relu3(torch.add(self.bn3(self.conv3(out)), identity))


class Inverted(nn.Module):
    """MobileNetV2-like inverted residual: residual only at stride 1 with equal widths."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        hid = 3 * cin
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class SeqBody(nn.Module):
    """``shortcut(x) + body(x)``: one submodule on each side; the branch is the one with weights."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.shortcut = nn.Identity()
        self.body = nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class UserResNet(nn.Module):
    """A user net mixing the block styles above (no residual_blocks(), no residual_parts())."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.stage1 = nn.Sequential(Basic(8, 8), FunctionalBasic(8, 8), FunctionalBasic(8, 12))
        self.stage2 = nn.Sequential(Basic(12, 16, 2), PreAct(16, 16), PreAct(16, 24, 2), SeqBody(24))
        self.stage3 = nn.Sequential(Bottleneck(24, 6), Bottleneck(24, 8, 2), Inverted(32, 32),
                                    Inverted(32, 40, 2), Inverted(40, 40))
        self.fc = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(F.relu(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_user_resnet() -> UserResNet:
    """Zero-arg factory for save/load."""
    return UserResNet()


def _p(pre=(), shortcut=None, post=None, **fn):
    return {"pre": list(pre), "shortcut": shortcut, "post": post, **fn}


# name -> (parts discovery must find, the branch's last module: zeroing its output zeroes the branch)
EXPECTED = {
    "stage1.0": (_p(post="relu"), "bn2"),
    "stage1.1": (_p(shortcut="shortcut", post_fn="relu"), "bn2"),
    "stage1.2": (_p(shortcut="shortcut", post_fn="relu"), "bn2"),
    "stage2.0": (_p(shortcut="downsample", post="relu"), "bn2"),
    "stage2.1": (_p(), "conv2"),
    "stage2.2": (_p(pre=["bn1", "act1"], shortcut="shortcut"), "conv2"),
    "stage2.3": (_p(shortcut="shortcut"), "body"),
    "stage3.0": (_p(post="relu3"), "bn3"),
    "stage3.1": (_p(shortcut="downsample", post="relu3"), "bn3"),
    "stage3.2": (_p(), "conv"),
    "stage3.4": (_p(), "conv"),
}


def _net() -> UserResNet:
    torch.manual_seed(0)
    return randomize(UserResNet(), X)


def _masked(model: nn.Module, ends: list[str]) -> torch.Tensor:
    """Output with each named module's output multiplied by 0 (a zero mask on the branch)."""
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, out: out * 0.0) for n in ends]
    try:
        with torch.no_grad():
            return model.eval()(X)
    finally:
        for h in hooks:
            h.remove()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=1e-6)


def test_discovery_finds_every_user_block_with_its_parts():
    model = _net()
    found = discover_blocks(model, X[:1])
    assert found == {n: parts for n, (parts, _) in EXPECTED.items()}
    assert residual_blocks(model, X[:1]) == list(EXPECTED)  # module order
    assert "stage3.3" in scan_blocks(model, X[:1]).rejected  # stride-2 inverted block: no sum


@pytest.mark.parametrize("name", list(EXPECTED))
def test_removing_a_found_block_equals_its_zeroed_branch_and_round_trips(name, tmp_path):
    from kdprune.io import load_pruned, save_pruned

    model = _net()
    expect = _masked(model, [f"{name}.{EXPECTED[name][1]}"])
    apply_edit(model, {"op": "remove_block", "module": name}, X[:1])
    assert isinstance(model.get_submodule(name), ShortcutOnly)
    with torch.no_grad():
        assert _same(model.eval()(X), expect)
    edit = model.kdprune_structure.edits[-1]
    assert edit == {"op": "remove_block", "module": name, "parts": EXPECTED[name][0]}
    loaded = load_pruned(save_pruned(model, tmp_path / "m", factory=make_user_resnet), factory=make_user_resnet)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    model.train()(X).sum().backward()  # an in-place post (shared ReLU) must not break training


def test_replay_uses_the_recorded_parts_not_rediscovery(tmp_path, monkeypatch):
    from kdprune.io import load_pruned, save_pruned

    model = _net()
    for n in ("stage1.1", "stage2.2", "stage3.0"):
        apply_edit(model, {"op": "remove_block", "module": n}, X[:1])
    d = save_pruned(model, tmp_path / "m", factory=make_user_resnet)

    def boom(*a, **k):
        raise AssertionError("replay must not rediscover")

    monkeypatch.setattr(blocks_mod, "discover_block", boom)
    with torch.no_grad():
        assert torch.equal(load_pruned(d, factory=make_user_resnet)(X), model.eval()(X))


def test_discovered_removals_replay_bit_exactly_in_a_fresh_process(tmp_path):
    from kdprune.io import save_pruned

    model = _net()
    names = ["stage1.0", "stage1.2", "stage2.2", "stage3.1", "stage3.4"]
    expect = _masked(model, [f"{n}.{EXPECTED[n][1]}" for n in names])
    for n in names:
        apply_edit(model, {"op": "remove_block", "module": n}, X[:1])
    with torch.no_grad():
        assert _same(model.eval()(X), expect)
    save_pruned(model, tmp_path / "m", factory=make_user_resnet)
    torch.save(X, tmp_path / "x.pt")
    code = ("import sys, torch, kdprune as kp; from safetensors.torch import save_file; "
            "from tests.engine.test_discover import make_user_resnet; d = sys.argv[1]; "
            "torch.set_num_threads(1); "  # as the test process (conftest): conv sums depend on threads
            "m = kp.load_pruned(d + '/m', factory=make_user_resnet); x = torch.load(d + '/x.pt');"
            "save_file({'y': m(x).detach()}, d + '/y.safetensors')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=180,
                   cwd=ROOT)
    with torch.no_grad():
        assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], model(X))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.f(x)], 1)[:, :8]


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.f(x)


class AlphaAdd(Scaled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.f(x), alpha=0.5)


class TwoAdds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = conv_bn(8, 8), conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x) + self.g(x)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class FunctionalPreAct(nn.Module):
    """kuangliu's PreActBlock: the projection reads F.relu(bn1(x)), which the protocol cannot name."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(8, 8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        return self.conv1(out) + self.shortcut(out)


class DataDependent(Scaled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x) if x.sum() > 0 else x  # not fx-traceable: skipped quietly


class Symmetric(nn.Module):
    """Two equal convs summed: either could be the shortcut, so neither is."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(8, 8), conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.body = nn.Sequential(Concat(), Scaled(), AlphaAdd(), TwoAdds(), Plain(), FunctionalPreAct(),
                                  DataDependent(), Symmetric(), nn.Sequential(conv_bn(8, 8), nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x)).mean((2, 3))


def test_sums_the_protocol_cannot_remove_are_not_listed():
    torch.manual_seed(0)
    model = randomize(NoBlocks(), X)
    scan = scan_blocks(model, X[:1])
    assert scan.found == {}
    assert set(scan.rejected) == {f"body.{i}" for i in range(8)}  # not body.8, a Sequential
    assert "not a sum" in scan.rejected["body.0"] and "not a sum" in scan.rejected["body.4"]
    assert "cannot trace" in scan.rejected["body.6"] and "scaled residual" in scan.rejected["body.2"]
    assert "either operand" in scan.rejected["body.7"]
    with pytest.raises(ValueError, match="no removable residual block: no submodule adds a shortcut to a branch"):
        residual_blocks(model, X[:1])
    with pytest.raises(ValueError, match=r"body.1 \(Scaled\) is not a removable residual block"):
        apply_edit(model, {"op": "remove_block", "module": "body.1"}, X[:1])
    assert not hasattr(model, "kdprune_structure")  # a refused edit is not recorded


def test_without_an_example_input_discovery_is_refused_clearly():
    model = _net()
    with pytest.raises(ValueError, match="does not list its residual blocks.*no example input"):
        residual_blocks(model)
    with pytest.raises(ValueError, match="no residual_parts.*no example input"):
        apply_edit(model, {"op": "remove_block", "module": "stage1.0"})


class Outer(nn.Module):
    """A residual block whose branch is itself a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = FunctionalBasic(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


def test_nested_blocks_report_the_innermost_and_the_outer_stays_removable():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(conv_bn(3, 8), Outer(), nn.Flatten()), X)
    scan = scan_blocks(model, X[:1])
    assert list(scan.found) == ["1.inner"] and "smaller residual block" in scan.rejected["1"]
    expect = _masked(model, ["1.inner"])
    apply_edit(model, {"op": "remove_block", "module": "1"}, X[:1])  # named explicitly: still removable
    with torch.no_grad():
        assert _same(model(X), expect)


ZOO = [("resnet20", {"shortcut": "A"}), ("resnet20", {"shortcut": "B"}), ("wrn16_2", {}), ("resnet18", {}),
       ("resnet50", {}), ("mobilenetv2", {})]


@pytest.mark.parametrize("name,kwargs", ZOO)
def test_zoo_discovery_gives_the_protocols_answer(name, kwargs):
    models = pytest.importorskip("kdprune.models")
    from kdprune.engine import residual_parts

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = randomize(models.create_model(name, num_classes=10, in_chans=3, **kwargs), x)
    protocol = {n: residual_parts(model.get_submodule(n), n) for n in model.residual_blocks()}
    assert protocol and discover_blocks(model, x[:1]) == protocol
