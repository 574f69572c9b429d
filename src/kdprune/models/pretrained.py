"""Shipped, verified base models: trained weights stored in the package (safetensors +
structure.json, no download), their provenance in ``bases/manifest.json``, the weights' sha256
checked on every load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

BASES = Path(__file__).with_name("bases")
PREFIX = "pretrained:"

__all__ = ["pretrained", "list_pretrained", "pretrained_info", "pretrained_dir", "PREFIX"]


def _manifest() -> dict[str, dict[str, Any]]:
    return json.loads((BASES / "manifest.json").read_text())


def list_pretrained() -> list[str]:
    """Names of the shipped bases."""
    return sorted(_manifest())


def pretrained_info(name: str) -> dict[str, Any]:
    """A shipped base's record: model, data, accuracy, the command and commit that trained it."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    bases = _manifest()
    if name not in bases:
        raise KeyError(f"no shipped base {name!r}; shipped: {', '.join(sorted(bases))}")
    return {"name": name, **bases[name]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrained_dir(name: str) -> Path:
    """The verified folder of a shipped base (ValueError if its weights do not match the manifest)."""
    info = pretrained_info(name)
    d = BASES / info["dir"]
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"shipped base {info['name']!r} has no weights at {weights} (incomplete install?)")
    got = _sha256(weights)
    if got != info["weights_sha256"]:
        raise ValueError(f"shipped base {info['name']!r}: {weights} has sha256 {got[:16]}..., the manifest "
                         f"says {info['weights_sha256'][:16]}...; the file is corrupt or was replaced: "
                         "reinstall kdprune")
    return d


def pretrained(name: str) -> nn.Module:
    """Load a shipped base (e.g. ``"resnet20-fmnist"``) after checking its sha256; eval mode."""
    from kdprune.io import load_pruned  # io rebuilds zoo models: import it only when loading

    return load_pruned(pretrained_dir(name))
