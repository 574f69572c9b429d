"""Model registry, create_model and the JSON spec used to rebuild models."""
from __future__ import annotations

import json

import pytest

from kdprune.metrics import count_params
from kdprune.models import MODELS, create_model, list_models

# Adding a model means adding it here and giving it a family test file.
EXPECTED = {
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "vgg16_bn", "mobilenetv2",
    "wrn16_2", "wrn16_8", "wrn28_10", "wrn40_1", "wrn40_2",
    "resnet18", "resnet50",
}


def test_list_models():
    names = list_models()
    assert names == sorted(names) and set(names) == EXPECTED
    assert all(n in MODELS for n in names)


def test_unknown_name_suggests_close_match():
    with pytest.raises(KeyError) as err:
        create_model("resnet57")
    msg = str(err.value)
    assert "resnet56" in msg and "Did you mean" in msg


def test_spec_round_trips_through_json():
    model = create_model("resnet20", num_classes=100, in_chans=1, shortcut="B")
    spec = json.loads(json.dumps(model.kdprune_spec))
    assert spec == {"name": "resnet20",
                    "kwargs": {"num_classes": 100, "in_chans": 1, "shortcut": "B"}}
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    assert rebuilt.kdprune_spec == spec
    assert count_params(rebuilt) == count_params(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}


def test_spec_defaults_are_recorded():
    assert create_model("mobilenetv2").kdprune_spec == {
        "name": "mobilenetv2", "kwargs": {"num_classes": 10, "in_chans": 3}}


def test_non_json_kwargs_rejected():
    with pytest.raises(TypeError, match="JSON"):
        create_model("resnet20", shortcut=object())


def test_unknown_kwarg_rejected():
    with pytest.raises(TypeError):
        create_model("resnet20", nonsense=1)


@pytest.mark.parametrize("name", sorted(EXPECTED - {"wrn28_10", "resnet50"}))  # big ones: own files
def test_every_model_declares_api(name):
    model = create_model(name)
    assert isinstance(model.feature_modules, list) and model.feature_modules
    for n in model.feature_modules:
        model.get_submodule(n)
    assert model.classifier_name in {"fc", "classifier"}
    assert model.get_classifier().out_features == 10
    assert (model.num_classes, model.in_chans) == (10, 3)
