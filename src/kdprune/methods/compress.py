"""`compress`: run a recipe on a copy of the model and report before/after, saved as JSON + Markdown."""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdprune.io import check_savable, save_pruned
from kdprune.methods.base import EXTRA_MODELS, CompressContext
from kdprune.methods.registry import run_recipe
from kdprune.metrics import Backend, available_backends, compare_backends, complexity, format_markdown, layer_widths
from kdprune.training import check_input_compat, compute, evaluate, train
from kdprune.training.config_io import to_tagged_dict
from kdprune.utils.dist import is_main_process
from kdprune.utils.meta import run_metadata, write_json


@dataclass
class CompressResult:
    """The physically pruned model and its report (also written to out_dir when given)."""

    model: nn.Module
    report: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    # Other pruned models the method produced, by their path under out_dir (Cascade's teaching
    # assistants: "assistants/ta1", ...); each also saved there.
    extras: dict[str, nn.Module] = field(default_factory=dict)

    def markdown(self) -> str:
        """The before/after table as Markdown."""
        return report_markdown(self.report)


def infer_example_input(data: Any) -> torch.Tensor:
    """A zero batch of one, shaped like the data's images."""
    ds = getattr(data, "dataset", data)
    images = getattr(ds, "images", None)
    shape = tuple(images.shape[1:]) if images is not None else tuple(ds[0][0].shape)
    return torch.zeros(1, *shape)


def measure(model: nn.Module, val: Any, example_input: torch.Tensor) -> dict[str, float]:
    """Accuracy on `val` plus params/FLOPs/MACs."""
    c = complexity(model, example_input=example_input)
    acc = evaluate(model, val) if val is not None else {}
    return {**{k: acc[k] for k in ("top1", "top5", "loss") if k in acc}, **c.as_dict()}


def _latency(dense: nn.Module, pruned: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """Interleaved medians before/after at batch 1 and 64: eager in ``latency_ms``, onnxruntime (when
    installed) in ``latency_onnxruntime_ms``; an export the runtime cannot run is a note, not an error."""
    size, models = tuple(example_input.shape[1:]), {"before": dense, "after": pruned}
    backends = [Backend.EAGER] + ([Backend.ONNXRUNTIME] if Backend.ONNXRUNTIME in available_backends() else [])
    out: dict[str, Any] = {}
    try:
        res = compare_backends(models, size, backends, batch_sizes=(1, 64), rounds=15)
    except Exception as e:  # noqa: BLE001 - the ONNX export of some models fails; eager still counts
        if len(backends) == 1:
            raise
        out["latency_onnxruntime_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        backends = [Backend.EAGER]
        res = compare_backends(models, size, backends, batch_sizes=(1, 64), rounds=15)
    for b in backends:
        key = "latency_ms" if b is Backend.EAGER else f"latency_{b.value}_ms"
        out[key] = {name: {str(bs): r for bs, r in per[b.value].items()} for name, per in res.items()}
    return out


def compress(
    model: nn.Module,
    recipe: Any,
    train: Any,
    val: Any = None,
    example_input: torch.Tensor | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    latency: bool = True,
    factory: Callable[[], nn.Module] | None = None,
    control_epochs: int | None = None,
    test: Any = None,
) -> CompressResult:
    """Compress a copy of `model` with `recipe` (a kdprune.recipes dataclass); the input is untouched.
    ``control_epochs``: also fine-tune the dense model that long (the recipe's fine-tune settings,
    plain cross-entropy) and report it, the control that tells pruning's cost from training's.
    ``test``: a held-apart set the report scores on (``val`` is then only for the run's choices and
    per-epoch scores, e.g. a split carved from the training set)."""
    start = time.perf_counter()
    check_input_compat(model, train)  # before anything runs: a wrong set fails naming both
    x = example_input if example_input is not None else infer_example_input(train)
    if x.dim() != 4 and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ValueError(f"the data's samples have shape {tuple(x.shape[1:])}, but {type(model).__name__} has 2-D "
                         "convolutions: it takes [C, H, W] images")
    scored = test if test is not None else val
    dense = copy.deepcopy(model).eval()
    before = measure(dense, scored, x)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_savable(model, factory)  # a user model without factory= fails now, not after training
    if out is not None and is_main_process():
        _claim_run(out, recipe, resume)
    ctx = CompressContext(dense, train, val, x, out, resume, progress, factory)
    with compute.tally() as spent:  # every training step and BN re-estimation the method runs (issue 36)
        pruned, info = run_recipe(recipe, copy.deepcopy(model), ctx)
    extras = info.pop(EXTRA_MODELS, {})
    pruned.eval()
    report = {"recipe": _recipe_record(recipe), "before": before, "after": measure(pruned, scored, x),
              "scored_on": "test" if test is not None else "val",
              "widths": {"before": layer_widths(dense), "after": layer_widths(pruned)},
              "method": info, "wall_time_s": time.perf_counter() - start, "train_flops": spent.total}
    if ctx.removal is not None:  # right after the removal step: before fine-tuning, without and with recal.
        pre, post = ctx.removal
        report["pruned"] = measure(pre, scored, x)
        if post is not None:
            report["recalibrated"] = measure(post, scored, x)
        ctx.removal = None
    if control_epochs is not None:
        report["control"] = _control(recipe, ctx, control_epochs, scored)
    if latency:
        report.update(_latency(dense, pruned, x))
    report["meta"] = run_metadata()
    if out is not None and is_main_process():
        _save(out, pruned, report, factory)
        for name, m in extras.items():
            save_pruned(m, out / name, factory=factory)
    return CompressResult(pruned, report, out, extras)


#: TrainConfig fields that say how a run runs, not what it computes: a resume may change them.
RUN_WIDE = ("threads", "progress", "device", "eval_batch_size", "label")
RECIPE_FILE = "recipe.json"


def recipe_identity(recipe: Any) -> dict[str, Any]:
    """The recipe as JSON (type and every field) minus the run-wide settings a resume may change."""
    data = to_tagged_dict(recipe)
    for k, v in data.items():
        if isinstance(v, dict) and "epochs" in v and "optimizer" in v:
            data[k] = {f: x for f, x in v.items() if f not in RUN_WIDE}
    return {"type": type(recipe).__name__, **json.loads(json.dumps(data))}


def identity_changes(old: dict[str, Any], recipe: Any) -> list[str]:
    """The fields in which ``recipe`` differs from a recorded ``recipe_identity``; a field the record
    lacks (added to the recipe type since) counts only when it is set away from its default."""
    mine = recipe_identity(recipe)
    at_default = {f.name for f in dataclasses.fields(recipe)
                  if f.default is not dataclasses.MISSING and getattr(recipe, f.name) == f.default}
    added = (set(mine) - set(old)) & at_default
    return sorted(k for k in (set(old) | set(mine)) - added if old.get(k) != mine.get(k))


def _claim_run(out: Path, recipe: Any, resume: bool) -> None:
    """Record the recipe in ``out``; a resume under another recipe (method, target, any field) is refused."""
    mine, path = recipe_identity(recipe), out / RECIPE_FILE
    if resume and path.is_file():
        old = json.loads(path.read_text())
        changed = identity_changes(old, recipe)
        if changed:
            raise ValueError(f"{out} holds a {old.get('type')} run; resuming it as {mine['type']} would change "
                             f"{', '.join(changed)}: resume with the same options, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, mine)


def _control(recipe: Any, ctx: CompressContext, epochs: int, scored: Any) -> dict[str, Any]:
    """The dense model fine-tuned ``epochs`` epochs with the recipe's fine-tune settings (resumable)."""
    if epochs < 1:
        raise ValueError(f"control_epochs must be >= 1, got {epochs}")
    cfg = ctx.with_progress(replace(recipe.finetune, epochs=epochs), "control")
    model = copy.deepcopy(ctx.dense).requires_grad_(True)  # a KD recipe froze the dense copy as its teacher
    res = train(model, ctx.train, ctx.val, cfg, out_dir=ctx.stage_dir("control"),
                resume=ctx.resumable("control"), save_model=False)
    return {**measure(res.model.eval(), scored, ctx.example_input), "epochs": epochs}


def _recipe_record(recipe: Any) -> dict[str, Any]:
    return {"type": type(recipe).__name__, **to_tagged_dict(recipe)}


def _save(out: Path, model: nn.Module, report: dict, factory) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_pruned(model, out / "model", factory=factory)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(report) + "\n")


#: The report's rows in order (key, label): the pruned rows are the model right after the method's
#: removal step, before any fine-tune, without and with the BatchNorm re-estimation.
_ROWS = (("before", ""), ("control", ""), ("pruned", "pruned, no fine-tune"),
         ("recalibrated", "pruned + BN recal., no fine-tune"), ("after", ""))


# which images the top-1 column is on: a choice made on a set and scored on it reads higher
_SCORED_ON = {"test": "top-1 on the held-apart test set (choices were made on the validation set)\n",
              "val": "top-1 on the validation set: the same images the run's choices (checkpoints, searches) "
                     "were made on; pass a test set for an unbiased score\n"}


def report_markdown(report: dict[str, Any]) -> str:
    """Before/after table: accuracy, params, FLOPs, latency (eager, onnxruntime when measured); the
    speed-ups, a latency target's check; then per-layer widths that changed."""
    rows = []
    for stage, label in _ROWS:
        if stage not in report:
            continue
        r = dict(report[stage], stage=label or stage)
        if stage == "control":  # the dense architecture: the dense model's latency
            r["stage"] = f"dense + {report['control']['epochs']} epoch(s)"
        timed = {"control": "before", "pruned": "after", "recalibrated": "after"}.get(stage, stage)
        for key, tag in (("latency_ms", "lat"), ("latency_onnxruntime_ms", "ort")):
            lat = report.get(key, {}).get(timed, {})
            r.update({f"{tag}_bs{bs}_ms": v["median_ms"] for bs, v in lat.items()})
        rows.append(r)
    cols = {"stage": "", "top1": "top-1 %", "params": "params", "macs": "MACs",
            "lat_bs1_ms": "CPU ms bs1", "lat_bs64_ms": "CPU ms bs64"}
    if "latency_onnxruntime_ms" in report:
        cols.update({"ort_bs1_ms": "ORT ms bs1", "ort_bs64_ms": "ORT ms bs64"})
    b, a = report["before"], report["after"]
    lines = [f"## {report['recipe']['type']}", "", _SCORED_ON.get(report.get("scored_on"), ""),
             format_markdown(rows, cols), "",
             f"kept: params {a['params'] / b['params']:.3f}, FLOPs {a['flops'] / b['flops']:.3f}; "
             f"wall time {report['wall_time_s']:.0f} s"]
    lines += _speedup_lines(report)
    changed = [{"layer": k, "before": v, "after": report["widths"]["after"].get(k, 0)}
               for k, v in report["widths"]["before"].items() if report["widths"]["after"].get(k) != v]
    if changed:
        lines += ["", format_markdown(changed, ["layer", "before", "after"])]
    return "\n".join(lines)


def _speedup_lines(report: dict[str, Any]) -> list[str]:
    """"speed-up (before / after median): eager ...; onnxruntime ..." and the latency target's check."""
    parts = []
    for key, name in (("latency_ms", "eager"), ("latency_onnxruntime_ms", "onnxruntime")):
        lat = report.get(key)
        if lat:
            ups = [f"bs{bs} {lat['before'][bs]['median_ms'] / lat['after'][bs]['median_ms']:.2f}x"
                   for bs in lat["after"] if lat["after"][bs]["median_ms"] > 0]
            parts.append(f"{name} {', '.join(ups)}")
    lines = [f"speed-up (before / after median): {'; '.join(parts)}"] if parts else []
    if "latency_onnxruntime_error" in report:
        lines.append(f"onnxruntime not measured: {report['latency_onnxruntime_error']}")
    check = report.get("method", {}).get("latency_target") if isinstance(report.get("method"), dict) else None
    if check:
        lines.append(f"latency target {check['target']:g} (batch {check['batch']}, {check['backend']}, "
                     f"{check['threads']} thread(s)): kept {check['measured']:.3f} measured, {check['predicted']:.3f} "
                     f"predicted, {check['refits']} refit(s), {check['entries_measured']} of {check['entries']} "
                     f"table entries timed")
    return lines
