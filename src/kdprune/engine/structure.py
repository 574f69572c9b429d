"""The structure log: an ordered, versioned list of JSON edits that turns a base (unpruned) model
into the pruned architecture. It lives on the model as ``model.kdprune_structure`` and is what
``kdprune.io`` saves, so a pruned model can be rebuilt without pickle: base model + replayed edits +
safetensors weights.

Each edit is a plain dict with an ``"op"`` key handled by an op registered in ``EDIT_OPS``::

    {"op": "prune_channels", "root": "layer1.0.conv1", "dim": "out", "idxs": [0, 3]}
    {"op": "identity_block", "module": "layer2.3"}
    {"op": "decompose", "module": ..., "rank": r, ...}      # registered by later methods
    {"op": "replace_module", ...}                           # registered by later methods

An op is any object with ``apply(model, edit, example_input) -> None`` (a class with a static
method, or a module), optionally ``apply_many(model, edits, example_input)`` for a run of its
edits at once (replay uses it). Ops register themselves with ``@register_edit("name")``; this
module imports none of them, so the op modules may import it (no import cycle).
"""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from kdprune.registry import Registry
from kdprune.utils.forward import probe_forward

__all__ = [
    "FORMAT_VERSION", "STRUCTURE_ATTR", "EditOp", "EDIT_OPS", "register_edit", "StructureLog",
    "get_structure", "record_edit", "apply_edit", "replay", "IdentityBlock",
]

FORMAT_VERSION = 1
STRUCTURE_ATTR = "kdprune_structure"


class EditOp(Protocol):
    """A structural edit kind: applies one JSON edit to a model in place."""

    @staticmethod
    def apply(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None) -> None: ...


EDIT_OPS: Registry[EditOp] = Registry("edit")


def register_edit(name: str) -> Callable[[Any], Any]:
    """Decorator registering an edit op (an object with ``apply(model, edit, example_input)``)."""
    return EDIT_OPS.register(name)


def _check_json(edit: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(edit, dict) or not isinstance(edit.get("op"), str):
        raise ValueError(f"an edit must be a dict with a string 'op' key, got {edit!r}")
    try:
        # Round-trip so the log never holds tensors/numpy scalars that would break save/load.
        return json.loads(json.dumps(edit))
    except TypeError as e:
        raise TypeError(f"edit {edit.get('op')!r} is not JSON-serialisable: {e}") from None


class StructureLog:
    """Versioned ordered list of structural edits plus the example input shape used to trace."""

    FORMAT_VERSION = FORMAT_VERSION

    def __init__(self, edits: Iterable[dict[str, Any]] = (), input_shape: Sequence[int] | None = None,
                 format_version: int = FORMAT_VERSION) -> None:
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"unknown structure format_version {format_version!r}; this kdprune reads "
                f"version {FORMAT_VERSION}"
            )
        self.edits: list[dict[str, Any]] = [_check_json(e) for e in edits]
        self.input_shape: list[int] | None = list(input_shape) if input_shape is not None else None

    def append(self, edit: dict[str, Any], example_input: torch.Tensor | None = None) -> None:
        """Record one edit; the first example input fixes ``input_shape`` (later different shapes
        are stored on the edit itself so replay traces each edit exactly as it was done)."""
        edit = _check_json(edit)
        if example_input is not None:
            shape = list(example_input.shape)
            if self.input_shape is None:
                self.input_shape = shape
            elif shape != self.input_shape:
                edit["input_shape"] = shape
        self.edits.append(edit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"format_version": FORMAT_VERSION, "input_shape": self.input_shape,
                "edits": copy.deepcopy(self.edits)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StructureLog":
        """Inverse of ``to_dict`` (ValueError on an unknown format_version)."""
        return cls(d.get("edits", []), d.get("input_shape"), d.get("format_version", -1))

    def example_input(self, edit: dict[str, Any] | None = None, device: torch.device | str = "cpu"
                      ) -> torch.Tensor | None:
        """Zeros of the recorded input shape (for the given edit), or None if none was recorded."""
        shape = (edit or {}).get("input_shape", self.input_shape)
        return None if shape is None else torch.zeros(*shape, device=device)

    def __len__(self) -> int:
        return len(self.edits)

    def __iter__(self):
        return iter(self.edits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StructureLog) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        ops = [e["op"] for e in self.edits]
        return f"StructureLog(v{FORMAT_VERSION}, input_shape={self.input_shape}, ops={ops})"


def get_structure(model: nn.Module, create: bool = False) -> StructureLog | None:
    """The model's structure log (``model.kdprune_structure``); created empty if ``create``."""
    log = getattr(model, STRUCTURE_ATTR, None)
    if log is None and create:
        log = StructureLog()
        # A plain attribute (not a submodule/buffer) so it rides along with copy.deepcopy and
        # never enters the state_dict.
        object.__setattr__(model, STRUCTURE_ATTR, log)
    return log


def record_edit(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None = None) -> None:
    """Append ``edit`` to the model's structure log (creating it on the first edit)."""
    get_structure(model, create=True).append(edit, example_input)


def apply_edit(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None = None) -> None:
    """Apply one registered edit to ``model`` in place and record it in the structure log."""
    edit = _check_json(edit)
    EDIT_OPS.get(edit["op"]).apply(model, edit, example_input)
    record_edit(model, edit, example_input)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _batch_end(edits: list[dict[str, Any]], i: int) -> int:
    """End of the run of edits from ``i`` that one ``apply_many`` call can take (same op, same
    traced input shape); ``i + 1`` when the op has no ``apply_many``."""
    op = EDIT_OPS.get(edits[i]["op"])
    j = i + 1
    if hasattr(op, "apply_many"):
        while j < len(edits) and edits[j]["op"] == edits[i]["op"] \
                and edits[j].get("input_shape") == edits[i].get("input_shape"):
            j += 1
    return j


def replay(model: nn.Module, log: StructureLog) -> nn.Module:
    """Re-apply every edit of ``log`` to a freshly built base model, in order; attaches a copy of
    the log to the model and returns it. Consecutive edits of an op with ``apply_many`` (e.g.
    prune_channels: one DepGraph for all of them) go in one call."""
    _apply_log(model, log)
    object.__setattr__(model, STRUCTURE_ATTR, StructureLog.from_dict(log.to_dict()))
    return model


def extend(model: nn.Module, log: StructureLog) -> nn.Module:
    """Apply the edits of ``log`` to ``model`` as ``replay`` does, appending them to the model's own
    log (a recorded removal step redone on the model it was first made on)."""
    _apply_log(model, log)
    own = get_structure(model, create=True)
    for e in log.edits:
        own.append(copy.deepcopy(e), None)
    if own.input_shape is None:
        own.input_shape = log.input_shape
    return model


def _apply_log(model: nn.Module, log: StructureLog) -> None:
    edits, i = log.edits, 0
    while i < len(edits):
        j = _batch_end(edits, i)
        op, x = EDIT_OPS.get(edits[i]["op"]), log.example_input(edits[i], _device(model))
        if j > i + 1:
            op.apply_many(model, edits[i:j], x)
        else:
            op.apply(model, edits[i], x)
        i = j


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} not found in {type(model).__name__}") from None
    setattr(parent, child, new)


@register_edit("identity_block")
class IdentityBlock:
    """Replace a (residual) block by nn.Identity, e.g. for block/layer pruning."""

    @staticmethod
    def apply(model: nn.Module, edit: dict[str, Any], example_input: torch.Tensor | None) -> None:
        """Swap ``edit["module"]`` for ``nn.Identity()``; with an example input, refuse a block
        whose output shape differs from its input's (identity cannot stand in for it)."""
        name = edit.get("module")
        if not isinstance(name, str) or not name:
            raise ValueError(f"identity_block edit needs a 'module' name, got {edit!r}")
        if example_input is not None:
            _check_shape_preserving(model, name, example_input)
        _set_submodule(model, name, nn.Identity())


def _check_shape_preserving(model: nn.Module, name: str, example_input: torch.Tensor) -> None:
    try:
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} not found in {type(model).__name__}") from None
    seen: list[tuple[tuple, tuple]] = []

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            seen.append((tuple(args[0].shape), tuple(out.shape)))

    probe_forward(model, example_input, {name: hook})
    if not seen:
        raise ValueError(f"identity_block: {name!r} did not run on the example input")
    bad = [(i, o) for i, o in seen if i != o]
    if bad:
        raise ValueError(f"identity_block: {name!r} maps {list(bad[0][0])} to {list(bad[0][1])}; only a "
                         "block whose output has its input's shape can be replaced by identity")
