"""The user's own model from the CLI: --factory MODULE:FN (+ --weights FILE) on compress, eval, export
and info, for a CNN of their own with a grouped conv, a squeeze-and-excitation block and a concat."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from kdprune.cli.main import main

from .test_commands import needs_data

MODULE = "kdp_user_cnn"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    def cbr(cin, cout, k=3, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())


    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


    class UserCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.grouped, self.se = cbr(1, 16), cbr(16, 32, groups=4), SE(32)
            self.a, self.b = cbr(32, 16, 1), cbr(32, 16)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            x = self.se(self.grouped(self.stem(x)))
            return self.head(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


    def build():
        return UserCNN()
''')
SMALL = ["--data", "fashion-mnist", "--train-subset", "256", "--val-subset", "64", "--batch-size", "64",
         "--epochs", "1", "--max-steps-per-epoch", "1", "--no-progress"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)  # the module sits beside the command, as a user's would
    yield tmp_path
    sys.modules.pop(MODULE, None)


@needs_data
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_compress_eval_export_info_of_a_user_model_from_its_weights(user_module, fmt, capsys):
    from kdprune.cli.user_model import import_factory

    torch.manual_seed(0)
    model = import_factory(f"{MODULE}:build")()  # the current folder on the path, as the CLI puts it
    weights = user_module / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(model.state_dict(), str(weights))
    else:
        torch.save({"state_dict": model.state_dict()}, weights)
    out, factory = user_module / "run", f"{MODULE}:build"
    assert main(["compress", "--method", "l1", "--factory", factory, "--weights", str(weights),
                 "--target-flops", "0.5", "--no-latency", *SMALL, "--out", str(out)]) == 0
    assert "| after |" in capsys.readouterr().out
    assert main(["eval", str(out), "--factory", factory, "--data", "fashion-mnist", "--val-subset", "64"]) == 0
    assert main(["export", str(out), "--factory", factory, "--format", "torchscript",
                 "--out", str(user_module / "m.pt")]) == 0
    assert main(["info", str(out), "--factory", factory]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2  # without it: the one line that says what to pass
    assert f"give --factory {MODULE}:build" in capsys.readouterr().err


def test_bad_factory_and_weights_are_one_line_errors(user_module, capsys):
    torch.manual_seed(0)
    save_file({"nope": torch.zeros(1)}, str(user_module / "bad.safetensors"))
    cases = [(["--weights", "bad.safetensors"], "--weights needs --factory"),
             (["--factory", "nomodule"], "expects MODULE:FN"),
             (["--factory", "no_such_module_here:build"], "cannot import module"),
             (["--factory", f"{MODULE}:nothing"], "has no 'nothing'"),
             (["--factory", f"{MODULE}:build", "--weights", "bad.safetensors"], "does not fit"),
             (["--factory", f"{MODULE}:build", "--weights", "missing.pt"], "no such file")]
    for extra, message in cases:
        assert main(["info", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
