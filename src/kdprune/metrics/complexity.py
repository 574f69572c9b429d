"""Params and FLOPs/MACs via torch.utils.flop_counter.FlopCounterMode, per model and per layer."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Complexity:
    """Model size and cost for one forward pass of the example input (batch of 1 by default)."""

    params: int
    flops: int  # multiply and add counted separately: flops == 2 * macs for conv/linear

    @property
    def macs(self) -> int:
        return self.flops // 2

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "macs": self.macs}


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _example(model: nn.Module, input_size, example_input) -> torch.Tensor:
    if example_input is not None:
        return example_input
    if input_size is None:
        raise ValueError("complexity() needs input_size=(1, C, H, W) or example_input")
    p = next(model.parameters(), None)
    return torch.zeros(*input_size, device=p.device if p is not None else "cpu")


def _count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs and per-module FLOPs keyed by the module's name in `named_modules()`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    # FlopCounterMode keys are "<RootClass>.<fqn>" plus a "Global" entry; strip the root
    # prefix so keys match named_modules() (the root module itself becomes "").
    root = type(model).__name__
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        if key == root:
            name = ""
        elif key.startswith(root + "."):
            name = key[len(root) + 1:]
        else:
            name = key
        per_module[name] = per_module.get(name, 0) + int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def complexity(
    model: nn.Module,
    input_size: tuple[int, ...] | None = None,
    example_input: torch.Tensor | None = None,
) -> Complexity:
    """Params and FLOPs of one forward pass (eval mode, no grad); MACs = FLOPs / 2."""
    total, _ = _count_flops(model, _example(model, input_size, example_input))
    return Complexity(params=count_params(model), flops=total)


def _kernel_str(k: Any) -> str:
    return "x".join(str(v) for v in k) if isinstance(k, tuple) else str(k)


def _layer_shape(m: nn.Module) -> dict[str, Any]:
    """in/out width, kernel and groups for the layer types a CNN pruner touches."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return {"in": m.in_channels, "out": m.out_channels,
                "kernel": _kernel_str(m.kernel_size), "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in": m.in_features, "out": m.out_features, "kernel": None, "groups": None}
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        width = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
        if width is None and isinstance(m, nn.LayerNorm):
            width = m.normalized_shape[-1] if m.normalized_shape else None
        return {"in": width, "out": width, "kernel": None, "groups": getattr(m, "num_groups", None)}
    return {"in": None, "out": None, "kernel": None, "groups": None}


def layer_table(
    model: nn.Module,
    input_size: tuple[int, ...] | None = None,
    example_input: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """One row per parametrised leaf module: name, type, in/out, kernel, groups, params, FLOPs."""
    _, per_module = _count_flops(model, _example(model, input_size, example_input))
    rows = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue  # only leaves: parents' counts would double-count their children
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if params == 0:
            continue
        flops = per_module.get(name, 0)
        rows.append({"name": name, "type": type(m).__name__, **_layer_shape(m),
                     "params": params, "flops": flops, "macs": flops // 2})
    return rows


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (conv) or features (linear) of every Conv/Linear, keyed by module name."""
    widths: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            widths[name] = int(m.out_features)
    return widths


Columns = Sequence[str] | Mapping[str, str] | None


def _headers(rows: Sequence[Mapping[str, Any]], columns: Columns) -> tuple[list[str], list[str]]:
    """(keys, header labels); a mapping renames columns, None takes the first row's keys."""
    if columns is None:
        keys = list(rows[0].keys()) if rows else []
        return keys, keys
    if isinstance(columns, Mapping):
        return list(columns.keys()), [str(v) for v in columns.values()]
    keys = list(columns)
    return keys, keys


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"  # thousands separators: param/FLOP counts are long
    if isinstance(v, float):
        return f"{v:,.2f}"
    return str(v)


def _is_numeric_column(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    vals = [r.get(key) for r in rows if r.get(key) is not None]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Columns = None) -> str:
    """Plain aligned text table; numeric columns right-aligned, missing values shown as "-"."""
    keys, headers = _headers(rows, columns)
    cells = [[_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    numeric = [_is_numeric_column(rows, k) for k in keys]

    def line(vals: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def format_markdown(rows: Sequence[Mapping[str, Any]], columns: Columns = None) -> str:
    """GitHub-flavoured Markdown table; numeric columns right-aligned."""
    keys, headers = _headers(rows, columns)
    numeric = [_is_numeric_column(rows, k) for k in keys]

    def esc(s: str) -> str:
        return s.replace("|", "\\|")  # a bare pipe would split the cell

    out = ["| " + " | ".join(esc(h) for h in headers) + " |",
           "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    out += ["| " + " | ".join(esc(_cell(r.get(k))) for k in keys) + " |" for r in rows]
    return "\n".join(out)
