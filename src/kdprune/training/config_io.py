"""Typed configs <-> plain dicts (JSON/YAML, the CLI, run records). Names map to types only here."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdprune.training.config import SGD, Adam, AdamW, Constant, Cosine, OneCycle, Step

T = TypeVar("T")

# A union field (optimizer, schedule, recipe...) is written as {"type": name, **fields}.
UNION_NAMES: dict[str, type] = {
    "sgd": SGD, "adam": Adam, "adamw": AdamW,
    "constant": Constant, "step": Step, "cosine": Cosine, "onecycle": OneCycle,
}


def type_name(cls: type) -> str:
    """The registered name of a config type."""
    for name, c in UNION_NAMES.items():
        if c is cls:
            return name
    raise KeyError(f"{cls.__name__} is not a registered config type")


def to_tagged_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data, nested configs tagged with "type" (for `from_dict`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            tagged = type(v) in UNION_NAMES.values()  # union members need their type to read back
            v = {"type": type_name(type(v)), **to_tagged_dict(v)} if tagged else to_tagged_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if all(dataclasses.is_dataclass(m) for m in members):
            return _from_tagged(value, where)
        return _coerce(members[0], value, where) if len(members) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where) if isinstance(value, dict) else value
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def _from_tagged(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value):
        return value
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError(f"{where}: expected a name or a mapping with 'type', got {value!r}")
    name = value["type"]
    if name not in UNION_NAMES:
        raise ValueError(f"{where}: unknown type {name!r}; known: {', '.join(sorted(UNION_NAMES))}")
    return from_dict(UNION_NAMES[name], {k: v for k, v in value.items() if k != "type"}, where)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build the frozen dataclass `cls` from a plain dict; unknown keys are a clear error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown)} for {cls.__name__}; "
                         f"valid: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data
