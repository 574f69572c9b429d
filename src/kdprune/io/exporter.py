"""``kp.export``: write a model as ONNX, TorchScript or a torch.export ExportedProgram (dynamic
batch, BN folded by default), check the artefact against the eager model, and write a sidecar JSON
(``<file>.json``) that says what it is: input shape, normalisation, source hash, versions, parity.
"""
from __future__ import annotations

import copy
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from kdprune.engine.structure import get_structure
from kdprune.io.artefacts import ExportError, ExportFormat, first_line, write_artefact
from kdprune.io.fold import FOLDED_ATTR
from kdprune.io.fold import fold_bn as fold_bn_fn
from kdprune.io.parity import (
    DEFAULT_TOLERANCE, ParityError, ParityReport, check_parity, failure_message, parity_inputs,
)
from kdprune.io.save import state_sha256
from kdprune.registry import check_choice, choices_of
from kdprune.utils.forward import flat_tensors
from kdprune.utils.meta import write_json
from kdprune.utils.onnxrt import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME

__all__ = ["export", "verify_export", "ExportError", "ExportResult", "Normalization", "NORMALIZATION_ATTR",
           "SIDECAR_VERSION", "sidecar_path"]

SIDECAR_VERSION = 1
#: Model attribute read when ``normalization`` is not passed: a Normalization or {"mean", "std"}.
NORMALIZATION_ATTR = "kdprune_normalization"


@dataclass(frozen=True)
class Normalization:
    """Input preprocessing the model expects: ``(x / 255 - mean) / std`` per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the sidecar stores)."""
        return {"mean": list(self.mean), "std": list(self.std), "formula": "(x / 255 - mean) / std per channel"}


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote and how its parity check went."""

    path: Path
    sidecar: Path
    format: ExportFormat
    parity: ParityReport | None
    folded: tuple[tuple[str, str], ...]  # (conv, bn) pairs folded
    record: dict[str, Any]  # the sidecar's content


def sidecar_path(path: str | Path) -> Path:
    """Where the sidecar of an artefact lives: the artefact's name plus ``.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
            raise ValueError("export: example_input must be a batched tensor [N, C, H, W]")
        return example_input.detach().float().cpu()
    log = get_structure(model)
    if log is None or not log.input_shape:
        raise ValueError(f"export: pass example_input= (a batch shaped like the real inputs); "
                         f"{type(model).__name__} records no input shape")
    return torch.randn(*log.input_shape, generator=torch.Generator().manual_seed(0))


def _normalization(model: nn.Module, given: Normalization | None) -> Normalization | None:
    found = given if given is not None else getattr(model, NORMALIZATION_ATTR, None)
    if found is None or isinstance(found, Normalization):
        return found
    if isinstance(found, Mapping) and {"mean", "std"} <= set(found):
        return Normalization(tuple(map(float, found["mean"])), tuple(map(float, found["std"])))
    raise TypeError(f"normalization must be a kdprune.io.Normalization, got {type(found).__name__}")


def _opset(fmt: ExportFormat, opset: int | None) -> int | None:
    if fmt is ExportFormat.ONNX:
        if opset is not None and int(opset) < DEFAULT_OPSET:
            # torch's exporter writes opset 18 at least; below that onnx's version converter fails and
            # the file would silently be opset 18 while the sidecar said otherwise
            raise ValueError(f"export: opset {opset} is not supported: torch {torch.__version__}'s ONNX exporter "
                             f"writes opset {DEFAULT_OPSET} or newer; give --opset {DEFAULT_OPSET} or more")
        return DEFAULT_OPSET if opset is None else int(opset)
    if opset is not None:
        raise ValueError(f"export: opset applies to ExportFormat.ONNX only, not {fmt}")
    return None


def _check_path(path: Path, fmt: ExportFormat) -> Path:
    if fmt is ExportFormat.EXPORTED_PROGRAM and path.suffix != ".pt2":
        raise ValueError(f"export: an ExportedProgram file must end in .pt2 (torch.export.load requires it), "
                         f"got {path}")
    _check_overwrite(path)
    return path


def _check_overwrite(path: Path) -> None:
    """ValueError unless ``path`` and its sidecar are new files or an earlier export's pair: an export
    never replaces a file it did not write (a saved model's weights, its structure.json, a checkpoint)."""
    side = sidecar_path(path)
    for p in (path, side):
        if p.is_dir():
            raise ValueError(f"export: {p} is a folder; give --out a file path")
    if side.is_file() and _is_sidecar(side):
        return  # re-exporting over an earlier export
    for p in (path, side):
        if p.exists():
            raise ValueError(f"export: refusing to overwrite {p}: it is no earlier export's file (a saved model, "
                             "checkpoint or other data would be lost); give --out a new path")


def _is_sidecar(path: Path) -> bool:
    try:
        return "sidecar_version" in json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, TypeError):
        return False


def _versions(fmt: ExportFormat) -> dict[str, str]:
    import kdprune

    out = {"kdprune": kdprune.__version__, "torch": torch.__version__, "python": platform.python_version()}
    if fmt is ExportFormat.ONNX:
        import onnx
        import onnxruntime

        out.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return out


def _shape(t: torch.Tensor) -> list[Any]:
    return ["batch", *t.shape[1:]]


def _record(model: nn.Module, source: nn.Module, x: torch.Tensor, path: Path, fmt: ExportFormat,
            opset: int | None, folded: Sequence[tuple[str, str]], fold: bool, norm: Normalization | None,
            report: ParityReport | None, notes: list[str]) -> dict[str, Any]:
    with torch.no_grad():
        outs = flat_tensors(source(x[:1]))
    log = get_structure(model)
    return {
        "sidecar_version": SIDECAR_VERSION,
        "file": path.name,
        "format": fmt.value,
        "opset": opset,
        "torch_version": torch.__version__,
        "versions": _versions(fmt),
        "input": {"name": INPUT_NAME, "shape": _shape(x), "dtype": "float32", "dynamic_axes": [0]},
        "outputs": [{"name": OUTPUT_NAME if i == 0 else f"output_{i}", "shape": _shape(o)}
                    for i, o in enumerate(outs)],
        "normalization": norm.as_dict() if norm is not None else None,
        "source": {"sha256": state_sha256(model), "class": f"{type(model).__module__}.{type(model).__qualname__}",
                   "model": getattr(model, "kdprune_spec", None), "edits": len(log) if log is not None else 0,
                   "params": sum(p.numel() for p in model.parameters())},
        "fold_bn": fold,
        "folded": [list(p) for p in folded],
        "parity": report.as_dict() if report is not None else None,
        "exporter_warnings": notes,
    }


def _write(exported: nn.Module, x: torch.Tensor, path: Path, fmt: ExportFormat, opset: int | None) -> list[str]:
    # torch.export treats a size-1 dimension as a constant: trace at batch >= 2 so batch stays dynamic
    trace_x = x if x.shape[0] > 1 else x.expand(2, *x.shape[1:]).contiguous()
    try:
        return write_artefact(exported, trace_x, path, fmt, opset)
    except ImportError:
        raise
    except Exception as e:  # the exporters raise many types; the user needs the cause, not the stack
        raise ExportError(f"export: {fmt.value} export of {type(exported).__name__} failed: {first_line(e)} "
                          f"(with a dynamic batch axis: a forward that fixes the batch size cannot be exported)"
                          ) from e


def _prepare(model: nn.Module, x: torch.Tensor, fold: bool) -> tuple[nn.Module, nn.Module, tuple]:
    """(eval-mode CPU copy of the source, the model to export, the folded pairs)."""
    source = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and train mode
    if not fold:
        return source, source, ()
    exported = fold_bn_fn(source, x)
    return source, exported, tuple(getattr(exported, FOLDED_ATTR, ()))


def export(model: nn.Module, path: str | Path, format: ExportFormat = ExportFormat.ONNX,
           example_input: torch.Tensor | None = None, *, fold_bn: bool = True, opset: int | None = None,
           inputs: torch.Tensor | None = None, normalization: Normalization | None = None, parity: bool = True,
           tolerance: float = DEFAULT_TOLERANCE, threads: int | None = None) -> ExportResult:
    """Export ``model`` to ``path`` (dynamic batch), check parity, write ``<path>.json``; see docs/export.md."""
    check_choice(format, ExportFormat, "export format")
    opset = _opset(format, opset)
    x = _example(model, example_input)
    path = _check_path(Path(path), format)
    path.parent.mkdir(parents=True, exist_ok=True)
    source, exported, folded = _prepare(model, x, fold_bn)
    norm = _normalization(model, normalization)
    notes = _write(exported, x, path, format, opset)
    report = None
    if parity:
        batch, note = parity_inputs(x, inputs)
        report = check_parity(source, exported, path, format, batch, note, tolerance, threads, folded)
    record = _record(model, source, x, path, format, opset, folded, fold_bn, norm, report, notes)
    side = sidecar_path(path)
    write_json(side, record)
    if report is not None and not report.passed:
        raise ParityError(failure_message(report, format, path, type(model).__name__, notes), report)
    return ExportResult(path, side, format, report, folded, record)


def verify_export(model: nn.Module, path: str | Path, inputs: torch.Tensor | None = None, *,
                  tolerance: float | None = None, threads: int | None = None) -> ParityReport:
    """Re-run the parity check of an artefact written by ``export`` (its sidecar says how); raises ParityError."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(f"verify_export: {path} or its sidecar {side} is missing")
    record = json.loads(side.read_text())
    fmt = choices_of(ExportFormat)[record["format"]]  # a name read from a file, as from YAML/CLI
    if record["source"]["sha256"] != state_sha256(model):
        raise ValueError(f"verify_export: {path} was exported from other weights than this model's "
                         "(the sidecar's source sha256 differs)")
    shape = record["input"]["shape"][1:]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    source, exported, folded = _prepare(model, x, bool(record["fold_bn"]))
    batch, note = parity_inputs(x, inputs)
    tol = tolerance if tolerance is not None else (record.get("parity") or {}).get("tolerance", DEFAULT_TOLERANCE)
    report = check_parity(source, exported, path, fmt, batch, note, tol, threads, folded)
    if not report.passed:
        raise ParityError(failure_message(report, fmt, path, type(model).__name__, just_written=False), report)
    return report
