"""kp.export: ONNX / TorchScript / ExportedProgram round trips with a dynamic batch, the sidecar,
the built-in parity check (a mismatch names its layer), verify_export on corrupted files, the CLI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

import kdprune as kp
from kdprune.cli.main import main
from kdprune.engine import Global, Target, prune_to_target
from kdprune.io import ExportError, ExportFormat, Normalization, ParityError, load_pruned, save_pruned, verify_export
from kdprune.io.parity import parity_inputs
from tests.engine.tiny_models import randomize

# the tests load artefacts with torch's own loaders, which torch 2.13 marks deprecated for TorchScript
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
SHAPE = (1, 16, 16)
FORMATS = list(ExportFormat)


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _needs(fmt: ExportFormat) -> None:
    if fmt is ExportFormat.ONNX:
        for mod in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(mod)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A 50%-FLOPs ResNet-20 with random BN statistics, saved and reloaded (as users get it)."""
    torch.manual_seed(0)
    x = _x(2)
    model = randomize(kp.create_model("resnet20", num_classes=10, in_chans=1), x)
    prune_to_target(model, x[:1], Target(flops=0.5), mode=Global())
    directory = save_pruned(randomize(model, x, seed=1), tmp_path_factory.mktemp("saved") / "r20")
    return load_pruned(directory), directory


def _run_artefact(path, fmt: ExportFormat, x: torch.Tensor) -> torch.Tensor:
    """Run an artefact with its own runtime, independently of kdprune's loaders."""
    if fmt is ExportFormat.ONNX:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert isinstance(sess.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch axis
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    if fmt is ExportFormat.TORCHSCRIPT:
        return torch.jit.load(str(path))(x)
    return torch.export.load(str(path)).module()(x)


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.value for f in FORMATS])
def test_round_trip_with_a_dynamic_batch(pruned, fmt, tmp_path):
    _needs(fmt)
    model, _ = pruned
    res = kp.export(model, tmp_path / f"m{fmt.suffix}", fmt, example_input=_x(2))
    p = res.parity
    assert p.passed and p.max_abs_diff <= 1e-4 and p.argmax_agreement == 1.0 and p.batch_sizes == (8, 1)
    assert p.fold_max_abs_diff <= 1e-5 and len(res.folded) == 19 and res.format is fmt
    x5 = _x(5, seed=7)
    with torch.no_grad():
        out, ref = _run_artefact(res.path, fmt, x5), model(x5)
    assert out.shape == (5, 10) and (out - ref).abs().max().item() <= 1e-4
    assert model.layer1[0].bn1.__class__ is nn.BatchNorm2d  # the caller's model is not folded


def test_sidecar_records_what_the_artefact_is(pruned, tmp_path):
    model, directory = pruned
    norm = Normalization((0.286,), (0.353,))
    res = kp.export(model, tmp_path / "m.pt", ExportFormat.TORCHSCRIPT, _x(2), normalization=norm)
    rec = json.loads(res.sidecar.read_text())
    assert res.sidecar.name == "m.pt.json" and rec == json.loads(json.dumps(res.record))
    assert rec["format"] == "torchscript" and rec["opset"] is None and rec["torch_version"] == torch.__version__
    assert rec["input"] == {"name": "input", "shape": ["batch", *SHAPE], "dtype": "float32", "dynamic_axes": [0]}
    assert rec["outputs"] == [{"name": "logits", "shape": ["batch", 10]}]
    assert rec["normalization"]["mean"] == [0.286] and rec["normalization"]["std"] == [0.353]
    saved = json.loads((directory / "structure.json").read_text())
    assert rec["source"]["sha256"] == saved["metadata"]["weights_sha256"]  # the weights it came from
    assert rec["source"]["model"]["name"] == "resnet20" and rec["source"]["edits"] == len(saved["edits"])
    assert rec["fold_bn"] is True and ["layer1.0.conv1", "layer1.0.bn1"] in rec["folded"]
    assert rec["parity"]["passed"] and rec["parity"]["max_abs_diff"] <= 1e-4 and rec["parity"]["argmax_agreement"] == 1


def test_sidecar_without_folding_or_normalisation(pruned, tmp_path):
    _needs(ExportFormat.ONNX)
    model, _ = pruned
    res = kp.export(model, tmp_path / "m.onnx", ExportFormat.ONNX, _x(2), fold_bn=False, opset=18)
    rec = res.record
    assert rec["opset"] == 18 and rec["fold_bn"] is False and rec["folded"] == [] and rec["normalization"] is None
    assert rec["parity"]["fold_max_abs_diff"] is None and "onnxruntime" in rec["versions"]


def test_example_from_the_recorded_shape_and_real_inputs(pruned, tmp_path):
    model, _ = pruned  # records input_shape [1, 1, 16, 16]: traced at batch 2, still dynamic
    res = kp.export(model, tmp_path / "m.pt2", ExportFormat.EXPORTED_PROGRAM, inputs=_x(6, seed=3))
    assert res.parity.passed and res.parity.batch_sizes == (6, 1) and res.parity.inputs == "given (6 samples)"
    assert _run_artefact(res.path, ExportFormat.EXPORTED_PROGRAM, _x(3)).shape == (3, 10)


class Flip(nn.Module):
    """Data-dependent branch: torch.jit.trace bakes in the branch its example took."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x if x.mean() < 0 else 2 * x


class FlipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.flip = Flip()
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flip(self.bn(self.conv(x))).flatten(1))


def test_a_mismatch_in_export_names_the_layer(tmp_path):
    torch.manual_seed(0)
    model = FlipNet().eval()
    with torch.no_grad():
        model.conv.weight.abs_()  # positive weights: a positive input gives a positive mean after conv
    path = tmp_path / "flip.pt"
    with pytest.raises(ParityError, match=r"first diverge at flip \(Flip\)") as err:
        kp.export(model, path, ExportFormat.TORCHSCRIPT, _x(2).abs() + 1, inputs=-(_x(4).abs() + 1))
    assert "TracerWarning" in str(err.value) and err.value.report.divergence.module == "flip"
    assert not err.value.report.divergence.by_folding
    assert json.loads((tmp_path / "flip.pt.json").read_text())["parity"]["passed"] is False
    with pytest.raises(ExportError, match="exported-program export of FlipNet failed"):
        kp.export(model, tmp_path / "flip.pt2", ExportFormat.EXPORTED_PROGRAM, _x(2))  # data-dependent branch


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(int(x.shape[0]), -1))  # eager is fine; a trace bakes the batch size in


def test_a_model_with_a_fixed_batch_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="does not run at batch size 8"):
        kp.export(FixedBatch(), tmp_path / "f.pt", ExportFormat.TORCHSCRIPT, _x(2))
    with pytest.raises(ExportError, match="exported-program export of FixedBatch failed"):
        kp.export(FixedBatch(), tmp_path / "f.pt2", ExportFormat.EXPORTED_PROGRAM, _x(2))


def _corrupt(path, fmt: ExportFormat, name: str) -> None:
    """Add 0.5 to one conv weight inside the written artefact."""
    if fmt is ExportFormat.ONNX:
        import onnx
        from onnx import numpy_helper

        m = onnx.load(str(path))
        init = next(i for i in m.graph.initializer if i.name == f"{name}.weight")
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.5, init.name))
        onnx.save(m, str(path))
    elif fmt is ExportFormat.TORCHSCRIPT:
        ts = torch.jit.load(str(path))
        with torch.no_grad():
            dict(ts.named_modules())[name].weight.add_(0.5)
        ts.save(str(path))
    else:
        ep = torch.export.load(str(path))
        with torch.no_grad():
            ep.state_dict[f"{name}.weight"].add_(0.5)
        torch.export.save(ep, str(path))


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.value for f in FORMATS])
def test_a_corrupted_artefact_is_detected_at_its_layer(pruned, fmt, tmp_path):
    _needs(fmt)
    model, _ = pruned
    path = kp.export(model, tmp_path / f"m{fmt.suffix}", fmt, _x(2)).path
    assert verify_export(model, path).passed
    _corrupt(path, fmt, "layer2.1.conv1")
    with pytest.raises(ParityError, match=r"first diverge at layer2\.1\.conv1 \(Conv2d\)") as err:
        verify_export(model, path)
    assert err.value.report.argmax_agreement is not None and "kept" not in str(err.value)
    other = load_pruned(pruned[1])
    with torch.no_grad():
        other.fc.bias.add_(1)
    with pytest.raises(ValueError, match="other weights"):
        verify_export(other, path)


def test_a_folding_fault_is_blamed_on_folding(pruned, tmp_path, monkeypatch):
    import kdprune.io.fold as fold

    real, calls = fold._fold_pair, []

    def faulty(conv: nn.Module, bn: nn.Module) -> None:  # folds the first pair (conv1, bn1) wrongly
        real(conv, bn)
        if not calls:
            conv.bias.data += 0.5
        calls.append(conv)

    monkeypatch.setattr(fold, "_fold_pair", faulty)
    with pytest.raises(ParityError, match=r"first diverge at bn1 \(Identity\).*BN folding is at fault") as err:
        kp.export(pruned[0], tmp_path / "m.pt", ExportFormat.TORCHSCRIPT, _x(2))
    assert err.value.report.divergence.by_folding and err.value.report.fold_max_abs_diff > 1e-4


def test_typed_choices_only(pruned, tmp_path):
    from kdprune.cli import export_cmd

    assert export_cmd.FORMATS == tuple(f.value for f in ExportFormat)  # the CLI names map onto the enum
    model, _ = pruned
    with pytest.raises(ValueError, match=r"pass ExportFormat\.ONNX"):
        kp.export(model, tmp_path / "m.onnx", "onnx", _x(2))
    with pytest.raises(ValueError, match="opset applies to ExportFormat.ONNX only"):
        kp.export(model, tmp_path / "m.pt", ExportFormat.TORCHSCRIPT, _x(2), opset=17)
    with pytest.raises(ValueError, match="must end in .pt2"):
        kp.export(model, tmp_path / "m.ep", ExportFormat.EXPORTED_PROGRAM, _x(2))
    with pytest.raises(ValueError, match="example_input"):
        kp.export(nn.Conv2d(1, 2, 3), tmp_path / "c.pt", ExportFormat.TORCHSCRIPT)


def test_cli_export(pruned, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pruned[1], run)
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    out = capsys.readouterr().out
    assert "19 BatchNorm folded" in out and "parity: max abs diff" in out
    rec = json.loads((run / "model.torchscript.pt.json").read_text())
    assert rec["parity"]["passed"] and rec["input"]["shape"] == ["batch", *SHAPE] and rec["fold_bn"]
    assert main(["export", str(run), "--format", "exported-program", "--no-fold-bn", "--out",
                 str(tmp_path / "x.pt2"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["format"] == "exported-program" and rec["fold_bn"] is False and (tmp_path / "x.pt2").is_file()
    assert main(["export", str(run), "--format", "torchscript", "--opset", "17"]) == 2
    assert "opset applies" in capsys.readouterr().err
    assert main(["export", str(run), "--opset", "7", "--out", str(tmp_path / "old.onnx")]) == 2
    assert "opset 7 is not supported" in capsys.readouterr().err and not (tmp_path / "old.onnx").exists()
    assert main(["export", str(tmp_path / "missing")]) == 2


def test_an_export_never_overwrites_a_file_it_did_not_write(pruned, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(pruned[1], run)
    saved = {p.name: p.read_bytes() for p in run.iterdir()}
    for out in (run / "model.safetensors", run / "structure"):  # the weights; the sidecar would be structure.json
        assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
        assert "refusing to overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == saved  # nothing lost
    with pytest.raises(ValueError, match="is a folder"):
        kp.export(pruned[0], run, ExportFormat.TORCHSCRIPT, _x(2))
    first = kp.export(pruned[0], tmp_path / "m.pt", ExportFormat.TORCHSCRIPT, _x(2))
    again = kp.export(pruned[0], tmp_path / "m.pt", ExportFormat.TORCHSCRIPT, _x(2))  # an earlier export: fine
    assert first.path == again.path and again.parity.passed


def test_cli_export_onnx(pruned, tmp_path, capsys):
    _needs(ExportFormat.ONNX)
    assert main(["export", str(pruned[1]), "--opset", "18", "--out", str(tmp_path / "m.onnx"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["format"] == "onnx" and rec["opset"] == 18 and rec["parity"]["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("name", kp.list_models())
def test_every_zoo_model_exports_with_parity(name, tmp_path):
    for fmt in (ExportFormat.ONNX, ExportFormat.TORCHSCRIPT):
        _needs(fmt)
        torch.manual_seed(0)
        x = torch.randn(2, 3, 32, 32)
        model = randomize(kp.create_model(name, num_classes=10, in_chans=3), x)
        with torch.no_grad():
            scale = model(parity_inputs(x)[0]).abs().max().item()
        # relative to the logits: rounding grows with depth and scale (1e-4 absolute for logits up to 1)
        res = kp.export(model, tmp_path / f"{name}{fmt.suffix}", fmt, x, tolerance=1e-4 * max(1.0, scale))
        assert res.parity.passed and res.parity.argmax_agreement == 1.0
