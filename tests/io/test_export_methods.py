"""A pruned model of every method exports to ONNX and TorchScript and passes parity with a dynamic
batch (exported at batch 2; kp.export's own parity check runs the artefact at other batches)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import kdprune as kp
from kdprune.cli.recipe_flags import methods, recipe_fields
from kdprune.io import ExportFormat
from kdprune.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
TINY = kp.TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=2, optimizer=kp.SGD(lr=0.02), progress=False)
# whole-block methods reach only the sizes that whole blocks give: a params target they can meet
TARGETS = {"oed": {"target_params": 0.7}}


def _recipe(name: str):
    cls = methods()[name]
    stages = {s: TINY for s in recipe_fields(cls)[1]} | {"finetune": TINY}
    extra = {"select_val": 20} if name == "oed" else {}
    return dataclasses.replace(cls(**TARGETS.get(name, {"target_flops": 0.5}), **extra), **stages)


@pytest.fixture(scope="module")
def pruned_models(toy_data_module):
    train, val = toy_data_module
    out = {}
    for name in sorted(methods()):
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=4, in_chans=1)
        out[name] = kp.compress(model, _recipe(name), train, val, latency=False).model.eval()
    return out


@pytest.fixture(scope="module")
def toy_data_module():
    from tests.conftest import make_images
    from kdprune.data import ImageDataset
    train, val = make_images(128, seed=0), make_images(32, seed=1)
    return train, ImageDataset(val.images, val.labels, val.classes, train.mean, train.std, "toy")


@pytest.mark.parametrize("fmt", [ExportFormat.ONNX, ExportFormat.TORCHSCRIPT])
@pytest.mark.parametrize("name", sorted(methods()))
def test_every_method_exports_with_parity(pruned_models, name, fmt, tmp_path):
    if fmt is ExportFormat.ONNX:
        for mod in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(mod)
    model = pruned_models[name]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / ("m.onnx" if fmt is ExportFormat.ONNX else "m.pt")
    with torch.no_grad():  # float32 resolution: a tiny net whose BatchNorms were re-estimated after 2 steps
        scale = max(1.0, float(model(x).abs().max()))  # of training can have logits in the thousands
    res = kp.export(model, path, fmt, example_input=x, tolerance=1e-4 * scale)
    rep = res.parity
    assert rep.passed and rep.max_abs_diff <= 1e-4 * scale and rep.argmax_agreement == 1.0
    assert 1 in rep.batch_sizes and max(rep.batch_sizes) > 2  # a batch other than the export's
