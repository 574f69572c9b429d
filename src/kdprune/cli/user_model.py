"""The user's own model on the command line: ``--factory MODULE:FN`` (a zero-arg callable building
the unpruned ``nn.Module``, imported with the current folder on the path) for a folder saved with
``factory=``, and ``--weights FILE`` (a state_dict of that model) to start from plain weights."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

from kdprune.cli.common import model_dir, source_path

__all__ = ["add_model_args", "import_factory", "load_cli_model", "read_state_dict"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--factory and --weights."""
    p.add_argument("--factory", metavar="MODULE:FN",
                   help="your model: a zero-arg callable returning the unpruned nn.Module (e.g. mynet:build, "
                        "imported with the current folder on the path); needed for a folder saved with "
                        "factory= and with --weights")
    p.add_argument("--weights", metavar="FILE",
                   help="start from a state_dict of the --factory model instead of a saved folder: "
                        ".safetensors, or .pt/.pth read with torch.load(weights_only=True) (no code runs)")


def import_factory(spec: str) -> Callable[[], Any]:
    """The callable ``MODULE:QUALNAME`` names (ValueError naming what is missing)."""
    module, _, qual = spec.partition(":")
    if not module or not qual:
        raise ValueError(f"--factory expects MODULE:FN (e.g. mynet:build), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a mynet.py beside the command, as `python -m` would see it
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"--factory {spec}: cannot import module {module!r} ({e})") from None
    for part in qual.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--factory {spec}: module {module!r} has no {qual!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--factory {spec}: {qual!r} is not callable")
    return obj


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors by name from a .safetensors file or a torch.save'd state_dict (restricted unpickler;
    a checkpoint dict holding it under "state_dict" or "model" is unwrapped)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"--weights {path}: not a state_dict torch can read safely ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
    return state


def load_cli_model(path_text: str | None, args: argparse.Namespace) -> tuple[Any, Callable[[], Any] | None, Path]:
    """(model, factory or None, source path) from PATH / --from, or from --factory + --weights."""
    factory = import_factory(args.factory) if getattr(args, "factory", None) else None
    weights = getattr(args, "weights", None)
    if weights:
        if factory is None:
            raise ValueError("--weights needs --factory MODULE:FN: the model the state_dict belongs to")
        model = factory()
        try:
            model.load_state_dict(read_state_dict(weights))
        except RuntimeError as e:  # missing/unexpected keys, shape mismatches: torch names them
            raise ValueError(f"--weights {weights} does not fit {args.factory}(): "
                             f"{' '.join(str(e).split())[:300]}") from None
        return model, factory, Path(weights)
    if path_text is None:
        raise ValueError("give a saved model or run directory (or --factory MODULE:FN --weights FILE)")
    import json

    import kdprune as kp

    path = source_path(path_text)
    folder = model_dir(path)
    recorded = json.loads((folder / "structure.json").read_text()).get("model", {}).get("factory")
    if factory is None and recorded is not None:
        raise ValueError(f"{path} holds a model saved with factory {recorded}: give --factory {recorded} "
                         "(the module importable from here)")
    return kp.load_pruned(folder, factory=factory), factory, path
