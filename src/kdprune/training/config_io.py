"""Typed configs <-> plain dicts (JSON/YAML, the CLI, run records). Names map to types only here:
a choice field (a union of tagged types such as the optimizer, ``mode: global``, or an Enum) is
read from its name or ``{type: name, **fields}`` through kdprune.registry's choice tags."""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdprune.registry import choice_name, choices_of
from kdprune.training.config import SGD, Adam, AdamW, Constant, Cosine, OneCycle, Step

T = TypeVar("T")

# The optimizer and schedule choices by name (the training flags look them up here).
UNION_NAMES: dict[str, type] = {choice_name(c): c for c in (SGD, Adam, AdamW, Constant, Step, Cosine, OneCycle)}


def type_name(cls: type) -> str:
    """The YAML/CLI name of a config choice type."""
    name = choice_name(cls)
    if name is None:
        raise KeyError(f"{cls.__name__} is not a registered config type")
    return name


def to_tagged_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data, nested configs tagged with "type" (for `from_dict`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and choice_name(v) is not None and not dataclasses.fields(v):
            v = choice_name(v)  # a choice without options is just its name (`mode: global`)
        elif dataclasses.is_dataclass(v):
            tagged = choice_name(v) is not None  # union members need their type to read back
            v = {"type": type_name(type(v)), **to_tagged_dict(v)} if tagged else to_tagged_dict(v)
        elif isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar(tp: type, value: Any, where: str) -> Any:
    """`value` checked against a scalar field type (YAML gives "no" and 12.5 as they are)."""
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[tp]
    if not ok:
        raise ValueError(f"{where}: expected {_SCALARS[tp]}, got {value!r}")
    return float(value) if tp is float else value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) not in typing.get_args(tp):
                raise ValueError(f"{where}: may not be empty (null)")
            return None
        if all(dataclasses.is_dataclass(m) for m in members):
            return _from_tagged(tp, value, where)
        return _coerce(members[0], value, where) if len(members) == 1 else value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict) and not dataclasses.is_dataclass(value):
            raise ValueError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where) if isinstance(value, dict) else value
    if origin is tuple:
        return _tuple(tp, value, where)
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    if tp in _SCALARS:
        return _scalar(tp, value, where)
    return value


def _tuple(tp: Any, value: Any, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
        raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
    return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))) if args else tuple(value)


def merge_tagged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Field-by-field merge of a partial config over a full tagged dict (a recipe's own defaults).

    Nested configs merge recursively; a union value naming another ``type`` replaces the default
    wholly (its fields then default to that type's own)."""
    out = dict(base)
    for k, v in override.items():
        cur = out.get(k)
        if isinstance(v, str) and isinstance(cur, dict) and "type" in cur:
            v = {"type": v}  # `schedule: cosine` is a union value by name
        if isinstance(v, dict) and isinstance(cur, dict) and v.get("type", cur.get("type")) == cur.get("type"):
            out[k] = merge_tagged(cur, v)
        else:
            out[k] = v
    return out


def _from_tagged(tp: Any, value: Any, where: str) -> Any:
    """A union field's value from its name or {"type": name, **fields}, among tp's members only."""
    if dataclasses.is_dataclass(value):
        return value
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError(f"{where}: expected a name or a mapping with 'type', got {value!r}")
    options, name = choices_of(tp), value["type"]
    key = name.lower() if isinstance(name, str) else name
    if key not in options:
        raise ValueError(f"{where}: unknown type {name!r}; choose one of {', '.join(sorted(options))}")
    return from_dict(options[key], {k: v for k, v in value.items() if k != "type"}, where)


def _enum(tp: type[enum.Enum], value: Any, where: str) -> enum.Enum:
    """An Enum field from its value's name (``anneal_strategy: cos``)."""
    if isinstance(value, tp):
        return value
    options = choices_of(tp)
    key = value.lower() if isinstance(value, str) else value
    if key not in options:
        raise ValueError(f"{where}: unknown choice {value!r}; choose one of {', '.join(sorted(options))}")
    return options[key]


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
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:  # one line: where and what, not a traceback
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data
