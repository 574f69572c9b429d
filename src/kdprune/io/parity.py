"""Parity of an exported artefact with the eager model it came from, and where a mismatch starts.

The artefact runs on the parity batch and on its first row alone (so the dynamic batch axis is
exercised at two sizes); its outputs are compared with the *source* eager model (unfolded), so BN
folding is checked too. On a mismatch the layer where it first appears is looked for on the few
worst samples: first between the folded and the source eager models (a folding fault), then
between the artefact's per-module outputs (see ``artefacts.probe_artefact``) and the eager ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kdprune.io.artefacts import ExportError, ExportFormat, Tap, first_line, load_runner, probe_artefact
from kdprune.utils.forward import flat_tensors

__all__ = ["DEFAULT_TOLERANCE", "Divergence", "ParityReport", "ParityError", "check_parity", "parity_inputs"]

DEFAULT_TOLERANCE = 1e-4
PARITY_BATCH = 8
PARITY_SEED = 0
_LOCALISE_SAMPLES = 4  # per-module tensors of every layer are kept: a few samples keep that small


@dataclass(frozen=True)
class Divergence:
    """The module where exported and eager outputs first differ (in eager execution order)."""

    module: str
    type: str
    max_abs_diff: float
    scale: float  # max |eager output| of that module
    by_folding: bool  # True: the folded eager model already differs there (a BN-folding fault)


@dataclass(frozen=True)
class ParityReport:
    """Exported vs eager outputs: the largest difference, argmax agreement, and where it starts."""

    passed: bool
    max_abs_diff: float
    argmax_agreement: float | None  # fraction of samples whose top-1 class agrees
    tolerance: float
    batch_sizes: tuple[int, ...]
    inputs: str  # where the parity batch came from
    fold_max_abs_diff: float | None  # folded vs unfolded eager model (None: not folded)
    output_scale: float  # max |eager output|: puts the absolute difference in proportion
    divergence: Divergence | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what the sidecar stores)."""
        return dataclasses.asdict(self)


class ParityError(ValueError):
    """The exported artefact does not reproduce the eager model's outputs."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


def parity_inputs(example: torch.Tensor, inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """The parity batch (``inputs``, or seeded normal samples shaped like ``example``) and its origin."""
    if inputs is not None:
        if inputs.dim() != example.dim() or tuple(inputs.shape[1:]) != tuple(example.shape[1:]):
            raise ValueError(f"export: parity inputs have shape {tuple(inputs.shape)}, but the example input "
                             f"is {tuple(example.shape)} (they must agree past the batch axis)")
        return inputs.detach().float().cpu(), f"given ({inputs.shape[0]} samples)"
    g = torch.Generator().manual_seed(PARITY_SEED)
    x = torch.randn(PARITY_BATCH, *example.shape[1:], generator=g)
    return x, f"random normal, seed {PARITY_SEED} ({PARITY_BATCH} samples)"


def capture_taps(model: nn.Module, x: torch.Tensor) -> dict[str, Tap]:
    """Every submodule called once in ``model(x)`` with a tensor output, in completion order."""
    taps: dict[str, Tap] = {}
    calls: dict[str, int] = {}

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                cl = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
                taps[name] = Tap(cl, dict(kwargs), out.detach().clone())
        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: t for n, t in taps.items() if calls[n] == 1}  # a module called twice has no single output


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item() if a.numel() else 0.0


def _first_divergence(taps: dict[str, Tap], got: dict[str, torch.Tensor], types: dict[str, str],
                      tol: float, skip: set[str], by_folding: bool) -> Divergence | None:
    for name, tap in taps.items():
        b = got.get(name)
        if name in skip or b is None or tuple(b.shape) != tuple(tap.output.shape):
            continue
        diff, scale = _diff(tap.output, b), tap.output.abs().max().item() if tap.output.numel() else 0.0
        # relative to the layer's scale: activations grow with depth, rounding with them
        if diff > tol * max(1.0, scale):
            return Divergence(name, types.get(name, "?"), diff, scale, by_folding)
    return None


def _localise(source: nn.Module, exported: nn.Module, path: Path, fmt: ExportFormat, x: torch.Tensor,
              tol: float, folded: Sequence[tuple[str, str]]) -> Divergence | None:
    types = {n: type(m).__name__ for n, m in exported.named_modules()}
    taps = capture_taps(exported, x)
    if folded:
        src = capture_taps(source, x)
        got = {n: t.output for n, t in taps.items()}
        div = _first_divergence(src, got, types, tol, {c for c, _ in folded}, by_folding=True)
        if div is not None:
            return div
    return _first_divergence(taps, probe_artefact(path, fmt, x, taps), types, tol, set(), by_folding=False)


def _agreement(ref: torch.Tensor, out: torch.Tensor) -> float | None:
    if ref.dim() < 2 or ref.shape != out.shape:
        return None
    return (ref.argmax(1) == out.argmax(1)).float().mean().item()


def _compare(ref: list[torch.Tensor], out: list[torch.Tensor], n: int) -> tuple[float, torch.Tensor]:
    """Largest abs difference over all outputs, and per sample (inf where shapes disagree)."""
    if not ref or len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        return float("inf"), torch.full((n,), float("inf"))
    per_sample = torch.zeros(n)
    for a, b in zip(ref, out):
        if not a.numel():
            continue
        d = (a.float() - b.float()).abs().nan_to_num(nan=float("inf"))  # NaN must fail, not compare False
        # outputs without a leading batch axis count against every sample
        rows = d.reshape(n, -1).amax(1) if d.dim() and d.shape[0] == n else d.max().expand(n)
        per_sample = torch.maximum(per_sample, rows)
    return per_sample.max().item(), per_sample


def _run(run: Any, x: torch.Tensor, what: str) -> list[torch.Tensor]:
    try:
        return flat_tensors(run(x))
    except Exception as e:  # onnxruntime and torch raise their own types for a shape they cannot take
        raise ExportError(f"{what} does not run at batch size {x.shape[0]} (parity runs two batch sizes: is "
                          f"the batch axis dynamic?): {first_line(e)}") from e


def _safe_localise(*args: Any) -> Divergence | None:
    try:
        return _localise(*args)
    except Exception:  # noqa: BLE001 - localising is best effort: never hide the parity failure itself
        return None


def check_parity(source: nn.Module, exported: nn.Module, path: Path, fmt: ExportFormat, x: torch.Tensor,
                 inputs_note: str, tolerance: float = DEFAULT_TOLERANCE, threads: int | None = None,
                 folded: Sequence[tuple[str, str]] = ()) -> ParityReport:
    """Run the artefact at ``path`` on ``x`` and ``x[:1]``, compare with eval-mode ``source``."""
    run = load_runner(path, fmt, threads)
    batches = [x, x[:1]] if x.shape[0] > 1 else [x]
    worst, worst_batch, agreement, scale = 0.0, (x, torch.zeros(x.shape[0])), None, 0.0
    with torch.no_grad():
        for i, xb in enumerate(batches):
            ref = _run(source, xb, f"the eager {type(source).__name__}")
            out = _run(run, xb, f"the {fmt.value} artefact {path}")
            diff, per_sample = _compare(ref, out, xb.shape[0])
            if i == 0 and ref and out:
                agreement = _agreement(ref[0], out[0])
                scale = max((r.abs().max().item() for r in ref if r.numel()), default=0.0)
            if diff >= worst:
                worst, worst_batch = diff, (xb, per_sample)
        fold_diff = _compare(flat_tensors(source(x)), flat_tensors(exported(x)), x.shape[0])[0] if folded else None
    passed = worst <= tolerance
    div = None
    if not passed:
        xb, per_sample = worst_batch
        rows = torch.argsort(per_sample, descending=True)[:_LOCALISE_SAMPLES]
        div = _safe_localise(source, exported, path, fmt, xb[rows.sort().values], tolerance, folded)
    return ParityReport(passed, worst, agreement, tolerance, tuple(b.shape[0] for b in batches), inputs_note,
                        fold_diff, scale, div)


def failure_message(report: ParityReport, fmt: ExportFormat, path: Path, what: str,
                    notes: Sequence[str] = (), just_written: bool = True) -> str:
    """The one-paragraph explanation a ParityError carries."""
    agree = "" if report.argmax_agreement is None else f", argmax agreement {report.argmax_agreement:.1%}"
    msg = (f"{fmt.value} export of {what} to {path} does not match the eager model: max abs diff "
           f"{report.max_abs_diff:.3g} > tolerance {report.tolerance:g} (largest |output| {report.output_scale:.3g}) "
           f"on {report.inputs}{agree}.")
    div = report.divergence
    if div is not None:
        msg += (f" The outputs first diverge at {div.module} ({div.type}): max abs diff {div.max_abs_diff:.3g} "
                f"where its eager output reaches {div.scale:.3g}.")
        if div.by_folding:
            msg += " The folded eager model already differs there: BN folding is at fault; export with fold_bn=False."
    else:
        msg += (" No single layer could be blamed: each layer the artefact exposes agrees within float rounding "
                "(accumulated rounding: pass a larger tolerance if acceptable), or the mismatch is in a layer it "
                "does not expose.")
    if notes:
        msg += " The exporter warned: " + " | ".join(n.splitlines()[0] for n in notes[:2])
    if just_written:
        msg += f" The artefact and its sidecar (parity.passed = false) are kept at {path} for inspection."
    return msg
