"""Shipped bases: verified by sha256 on every load, reachable from Python and the CLI."""
import json
import shutil

import pytest
import torch

import kdprune as kp
from kdprune.cli.main import main
from kdprune.models import pretrained as pt


MANIFEST = json.loads((pt.BASES / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_base_loads_and_matches_its_manifest(name):
    info = pt.pretrained_info(f"pretrained:{name}")
    m = kp.pretrained(name)
    assert not m.training and m.kdprune_spec == {"name": info["model"], "kwargs": info["model_kwargs"]}
    assert info["data"] == "fashion-mnist" and info["test_top1"] > 92 and len(info["commit"]) == 40
    assert pt._sha256(pt.pretrained_dir(name) / "model.safetensors") == info["weights_sha256"]
    with torch.no_grad():
        assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    bases = tmp_path / "bases"
    shutil.copytree(pt.BASES, bases)
    monkeypatch.setattr(pt, "BASES", bases)
    weights = bases / "resnet20-fmnist" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one flipped bit in the last weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt or was replaced"):
        kp.pretrained("resnet20-fmnist")
    with pytest.raises(KeyError, match="shipped: resnet20-fmnist"):
        pt.pretrained_info("resnet99-fmnist")


def test_cli_takes_a_pretrained_source(capsys):
    assert main(["info", "pretrained:resnet20-fmnist"]) == 0
    assert "resnet20: params 269,434" in capsys.readouterr().out
    assert main(["info", "pretrained:nope"]) == 2
    assert "no shipped base 'nope'" in capsys.readouterr().err


def test_manifest_lists_every_shipped_folder():
    manifest = json.loads((pt.BASES / "manifest.json").read_text())
    folders = {p.name for p in pt.BASES.iterdir() if p.is_dir()}
    assert {v["dir"] for v in manifest.values()} == folders
