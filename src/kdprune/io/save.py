"""Pickle-free save/load of pruned models: ``structure.json`` (how to rebuild the architecture:
base model + the structure log's edits) and ``model.safetensors`` (every state tensor).

Loading never unpickles anything: the base model is built by code (``kdprune.models.create_model``
or a user factory), the edits are replayed from JSON, and the weights come from safetensors.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from kdprune.engine.masks import MASKS_ATTR
from kdprune.engine.structure import FORMAT_VERSION, StructureLog, get_structure, replay
from kdprune.io.fold import FOLDED_ATTR
from kdprune.utils.meta import atomic_write_bytes, write_json

__all__ = ["save_pruned", "check_savable", "load_pruned", "STRUCTURE_FILE", "WEIGHTS_FILE", "factory_name",
           "state_sha256"]

STRUCTURE_FILE = "structure.json"
FACTORY_ATTR = "kdprune_factory"
WEIGHTS_FILE = "model.safetensors"
_REPLAY_ERRORS = (ValueError, KeyError, AttributeError, IndexError, RuntimeError, AssertionError, TypeError)


def factory_name(factory: Callable[[], nn.Module]) -> str:
    """``"module:qualname"`` of a factory callable (what structure.json records)."""
    qual = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    return f"{getattr(factory, '__module__', None) or type(factory).__module__}:{qual}"


def _split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors for safetensors (which refuses shared storage): identical views are
    stored once and recorded as aliases; partially overlapping ones are cloned."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_view: dict[tuple, str] = {}
    seen_storage: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.numel() == 0:
            tensors[name] = t.cpu().contiguous().clone()
            continue
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen_view:
            aliases[name] = seen_view[view]
            continue
        seen_view[view] = name
        ptr = view[0]
        shared = ptr in seen_storage
        seen_storage.add(ptr)
        t = t.cpu().contiguous()
        tensors[name] = t.clone() if shared or t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    return tensors, aliases


def _weights_blob(model: nn.Module) -> tuple[bytes, dict[str, str]]:
    tensors, aliases = _split_shared(model.state_dict())
    return st_save(tensors, metadata={"format": "pt"}), aliases


def state_sha256(model: nn.Module) -> str:
    """sha256 of the model's weights as ``save_pruned`` writes them (its ``weights_sha256``)."""
    return hashlib.sha256(_weights_blob(model)[0]).hexdigest()


def _model_record(model: nn.Module, factory: Callable[[], nn.Module] | None) -> dict[str, Any]:
    spec = getattr(model, "kdprune_spec", None)
    # A model loaded through a factory remembers it, so it can be re-saved without repeating it.
    factory = factory if factory is not None else getattr(model, FACTORY_ATTR, None)
    if factory is None and spec is None:
        raise ValueError(
            "save_pruned: the model has no kdprune_spec and no factory was given, so it could not "
            "be rebuilt. Build it with kdprune.models.create_model(...), or pass factory=<zero-arg "
            "callable returning the unpruned model> (and the same factory to load_pruned)"
        )
    rec: dict[str, Any] = {}
    if factory is not None:
        if not callable(factory):
            raise TypeError(f"factory must be a zero-arg callable, got {type(factory).__name__}")
        rec["factory"] = factory_name(factory)
    if spec is not None:
        rec["name"], rec["kwargs"] = spec["name"], dict(spec.get("kwargs", {}))
    return rec


def check_savable(model: nn.Module, factory: Callable[[], nn.Module] | None = None) -> None:
    """ValueError now, naming the fix, when ``save_pruned(model, ..., factory)`` could not record how to
    rebuild the model (a user model without a factory): before a long run, not after it."""
    _model_record(model, factory)


def save_pruned(model: nn.Module, directory: str | Path, factory: Callable[[], nn.Module] | None = None) -> Path:
    """Write ``structure.json`` + ``model.safetensors`` (atomically) into ``directory``; returns it.

    The base model is recorded from ``model.kdprune_spec`` (zoo models) and/or ``factory`` (default:
    ``model.kdprune_factory``, set by ``load_pruned``), a zero-arg callable building the unpruned
    model, recorded as ``"module:qualname"``."""
    import kdprune

    if getattr(model, MASKS_ATTR, None) is not None:
        raise ValueError("save_pruned: the model has soft masks attached; fold_gates_into_bn / "
                         "apply the masks (masks_to_plan + apply_plan) or MaskSet.remove() first")
    if getattr(model, FOLDED_ATTR, None):
        raise ValueError("save_pruned: the model has BatchNorm folded into its convs (fold_bn), which "
                         "load_pruned cannot replay; save the model before folding (export folds it itself)")
    directory = Path(directory)
    rec = _model_record(model, factory)
    blob, aliases = _weights_blob(model)
    log = get_structure(model) or StructureLog()
    record = {
        "format_version": FORMAT_VERSION,
        "kdprune_version": kdprune.__version__,
        "model": rec,
        "input_shape": log.input_shape,
        "edits": log.to_dict()["edits"],
        "metadata": {
            "params": sum(p.numel() for p in model.parameters()),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
            "aliases": aliases,
            "torch_version": torch.__version__,
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
        },
    }
    # Weights first, structure last: a structure.json on disk always describes complete weights
    # (a crash in between leaves a sha256 mismatch that load_pruned reports).
    atomic_write_bytes(directory / WEIGHTS_FILE, blob)
    write_json(directory / STRUCTURE_FILE, record)
    return directory


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the save is corrupt") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} does not hold a kdprune structure record")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has unknown format_version {version!r}; this kdprune "
                         f"reads format_version {FORMAT_VERSION} (upgrade kdprune?)")
    for key in ("model", "edits"):
        if key not in record:
            raise ValueError(f"{path} lacks the {key!r} entry; the save is corrupt")
    return record


def _build_base(record: dict[str, Any], factory: Callable[[], nn.Module] | None, path: Path) -> nn.Module:
    rec = record["model"]
    if factory is not None:
        saved = rec.get("factory")
        if saved is not None and saved != factory_name(factory):
            warnings.warn(f"{path} was saved with factory {saved!r} but load_pruned got "
                          f"{factory_name(factory)!r}; the structure may not fit", stacklevel=3)
        elif saved is None:
            warnings.warn(f"{path} was saved from zoo model {rec.get('name')!r}; using the given "
                          "factory instead", stacklevel=3)
        base = factory()
    elif "name" in rec:
        from kdprune.models import create_model  # lazy: io must not pull the zoo in at import

        base = create_model(rec["name"], **rec.get("kwargs", {}))
    else:
        raise ValueError(f"{path} was saved with factory {rec.get('factory')!r}; pass that "
                         "factory to load_pruned(directory, factory=...)")
    if not isinstance(base, nn.Module):
        raise TypeError(f"the factory returned {type(base).__name__}, not an nn.Module")
    if len(get_structure(base) or ()) > 0:
        raise ValueError("the factory must return the unpruned base model, but it already has edits")
    return base


def _check_weights(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the rebuilt model: missing tensors {missing[:5]}, "
                         f"unexpected tensors {unexpected[:5]}")
    for name, t in expected.items():
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the "
                             f"rebuilt model expects {tuple(t.shape)}")


def _load_tensors(path: Path, record: dict[str, Any], map_location: str | torch.device) -> dict[str, torch.Tensor]:
    meta = record.get("metadata", {})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if meta.get("weights_sha256") not in (None, digest):
        raise ValueError(f"{path} is corrupt or truncated: its sha256 does not match structure.json")
    try:
        tensors = load_file(str(path), device=str(map_location))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError variants
        raise ValueError(f"{path} is corrupt or truncated and cannot be read: {e}") from None
    for alias, canonical in meta.get("aliases", {}).items():
        tensors[alias] = tensors[canonical]
    return tensors


def load_pruned(directory: str | Path, factory: Callable[[], nn.Module] | None = None,
                map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_pruned``: base model, replayed edits, safetensors weights
    (strict); returned in eval mode with ``kdprune_spec``/``kdprune_structure`` attached."""
    directory = Path(directory)
    spath, wpath = directory / STRUCTURE_FILE, directory / WEIGHTS_FILE
    for p in (spath, wpath):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; {directory} is not a complete save_pruned directory")
    record = _read_record(spath)
    tensors = _load_tensors(wpath, record, map_location)
    model = _build_base(record, factory, spath)
    log = StructureLog(record["edits"], record.get("input_shape"))
    try:
        replay(model, log)
    except _REPLAY_ERRORS as e:
        raise ValueError(f"{spath} was saved from a different model: replaying its edits on "
                         f"{type(model).__name__} failed ({e})") from None
    model.to(map_location)
    _check_weights(model, tensors, wpath)
    model.load_state_dict(tensors, strict=True)
    if factory is not None:
        object.__setattr__(model, FACTORY_ATTR, factory)
    if "name" in record["model"] and getattr(model, "kdprune_spec", None) is None:
        model.kdprune_spec = {"name": record["model"]["name"], "kwargs": record["model"].get("kwargs", {})}
    return model.eval()
