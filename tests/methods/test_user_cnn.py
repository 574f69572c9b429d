"""Every registered method end to end on a CNN of a user's own (a grouped conv in a residual block,
squeeze-and-excitation, a two-branch concat, a linear head), from a plain TensorDataset: compress,
save, reload in a fresh process (same outputs), export to ONNX with parity."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdprune as kp
from kdprune.cli.recipe_flags import methods, recipe_fields

from .reload import reload_mismatches

TINY = kp.TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, augment=False, progress=False)
# targets each method's steps reach on so small a net (whole blocks: OED's one residual block)
TARGETS = {"tp-magnitude": {"target_flops": 0.77}, "tp-groupnorm": {"target_flops": 0.77},
           "cascade": {"target_flops": 0.57}, "oed": {"target_params": 0.37},
           # SDAP's global ranking moves the grouped conv's channels in tie classes of 4: 0.6 lands at 0.589
           "sdap": {"target_flops": 0.5}}


def _cbr(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(c, c, groups=4), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class UserCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.res, self.se = _cbr(3, 32), Res(32), SE(32)
        self.a, self.b = _cbr(32, 16, 1), _cbr(32, 16)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.res(self.stem(x)))
        return self.head(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def build() -> UserCNN:
    """The factory save/load records (tests.methods.test_user_cnn:build)."""
    torch.manual_seed(0)
    return UserCNN()


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.randn(n, 3, 12, 12, generator=g) + y[:, None, None, None].float() * 0.5
    return TensorDataset(x, y)


def _recipe(name: str):
    cls = methods()[name]
    stages = {s: TINY for s in recipe_fields(cls)[1]} | {"finetune": TINY}
    extra = {"oed": {"select_val": 8, "lam": 0.0}, "cascade": {"assistants": 0},
             "kesi": {"rounds": 2}, "pfec": {"rounds": 2}}.get(name, {})
    return dataclasses.replace(cls(**TARGETS.get(name, {"target_flops": 0.6}), **extra), **stages)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root, train, val = tmp_path_factory.mktemp("user_cnn"), _data(64, 0), _data(16, 1)
    x, out, errors = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(9)), {}, {}
    for name in sorted(methods()):
        try:
            res = kp.compress(build(), _recipe(name), train, val, out_dir=root / name, latency=False, factory=build)
        except ValueError as e:  # a method that cannot handle this construct must say so in one line
            errors[name] = str(e)
            continue
        with torch.no_grad():
            out[name] = res.model.eval()(x)
    torch.save({"x": x, "out": out}, root / "ref.pt")
    return root, out, errors


def test_every_method_compresses_the_user_cnn_or_says_why(compressed):
    _, out, errors = compressed
    assert set(out) | set(errors) == set(methods())
    # what cannot run says why: torch-pruning's GroupNormPruner on the grouped conv (issue 34)
    assert set(errors) <= {"tp-groupnorm"}, errors
    assert all("\n" not in e for e in errors.values())


def test_saved_models_reload_in_a_fresh_process_with_the_same_outputs(compressed):
    root, out, _ = compressed
    assert reload_mismatches(root, "tests.methods.test_user_cnn:build", timeout=300) == []
    assert len(out) >= len(methods()) - 1


@pytest.mark.parametrize("name", sorted(methods()))
def test_each_exports_to_onnx_with_parity(compressed, name, tmp_path):
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)
    root, out, _ = compressed
    if name not in out:
        pytest.skip(f"{name} refused this model (tested above)")
    model = kp.load_pruned(root / name / "model", factory=build)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = max(1.0, float(model(x).abs().max()))
    res = kp.export(model, tmp_path / "m.onnx", kp.ExportFormat.ONNX, example_input=x, tolerance=1e-4 * scale)
    assert res.parity.passed
