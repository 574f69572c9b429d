"""kdprune: structured pruning of CNNs guided by knowledge distillation.

The public API (see DESIGN.md): `create_model`, `data.load`, `train`/`TrainConfig`, `compress`
with `recipes`, `save_pruned`/`load_pruned`, `export`/`ExportFormat`/`fold_bn`, `complexity`, `evaluate`.
Names load lazily so that `import kdprune` (and the CLI's --help) stays fast.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# Before torch loads libgomp (it reads the variable once, when it loads): spinning OpenMP
# threads are 5-50x slower whenever another process holds a core (measured on 2 shared cores),
# and sleeping ones cost little when idle. A value the user set wins. Importing torch *before*
# kdprune is too late for this: export OMP_WAIT_POLICY=PASSIVE yourself in that case.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "create_model": "kdprune.models",
    "list_models": "kdprune.models",
    "train": "kdprune.training",
    "evaluate": "kdprune.training",
    "TrainConfig": "kdprune.training",
    "TrainResult": "kdprune.training",
    "SGD": "kdprune.training",
    "Adam": "kdprune.training",
    "AdamW": "kdprune.training",
    "Cosine": "kdprune.training",
    "Step": "kdprune.training",
    "OneCycle": "kdprune.training",
    "Constant": "kdprune.training",
    "complexity": "kdprune.metrics",
    "save_pruned": "kdprune.io",
    "load_pruned": "kdprune.io",
    "fold_bn": "kdprune.io",
    "export": "kdprune.io",
    "ExportFormat": "kdprune.io",
    "compress": "kdprune.methods",
    "CompressResult": "kdprune.methods",
    "Target": "kdprune.engine",
    "seed_everything": "kdprune.utils.seed",
    "pretrained": "kdprune.models.pretrained",
    "list_pretrained": "kdprune.models.pretrained",
}
_SUBMODULES = ("data", "models", "metrics", "training", "engine", "distill", "io", "methods", "recipes", "bench",
               "utils")

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"kdprune.{name}")
    else:
        raise AttributeError(f"module 'kdprune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
