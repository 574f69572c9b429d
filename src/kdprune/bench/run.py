"""The bench grid: methods x targets x seeds from one base, each run through ``kp.compress`` with
its own resumable folder, each finished run appended to the results JSONL at once; plus the dense
base, the dense + same-epochs control and the equal-wall-time baselines."""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from torch import nn

from kdprune.bench.config import CONTROL, BenchConfig, BenchMethod, configure, configure_stage, target_label
from kdprune.bench.results import append_line, describe_machine, provenance, read_lines
from kdprune.data import SPLIT_SEED, ImageDataset
from kdprune.engine import Target
from kdprune.io import load_pruned
from kdprune.methods import compress, infer_example_input
from kdprune.methods.compress import identity_changes, recipe_identity
from kdprune.methods.base import default_finetune
from kdprune.metrics import complexity
from kdprune.training import evaluate, resolve_device, train
from kdprune.training.config_io import to_tagged_dict

__all__ = ["BenchData", "RunSpec", "prepare_data", "load_base", "grid", "wall_runs", "run_bench",
           "EQUAL_EPOCHS", "EQUAL_WALL", "EQUAL_COMPUTE", "compute_runs", "BASE_RUN", "BASE_LABEL", "CONTROL_LABEL"]

EQUAL_EPOCHS, EQUAL_WALL, EQUAL_COMPUTE = "equal epochs", "equal wall", "equal compute"
BASE_RUN, BASE_LABEL, CONTROL_LABEL = "dense-base", "dense base", "dense + same epochs"


class BenchData(NamedTuple):
    """Train (the drawn images minus the held-out split), val (held out, or the test set when the
    config holds none out: then nothing is chosen on it) and test (reported only)."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset

    @property
    def held_out(self) -> bool:
        """A split was held out of the training images (val is not the test set)."""
        return self.val is not self.test


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: its tag (folder under runs/ and JSONL key) and configured recipe."""

    tag: str
    label: str
    recipe: Any
    target: Target
    seed: int
    budget: str = EQUAL_EPOCHS
    reference: dict[str, Any] | None = None  # equal wall: the reference run it matches


def prepare_data(cfg: BenchConfig, data: tuple[ImageDataset, ImageDataset] | None = None) -> BenchData:
    """The config's images: ``data`` (train, test) when given (from Python), else the named set."""
    if data is None:
        import kdprune

        data = kdprune.data.load(cfg.data.name, **({"root": cfg.data.root} if cfg.data.root else {}))
    full, test = data
    d = cfg.data
    held = None
    if d.val_split:  # the same held-out images as train/compress --val-split and the option-B bases
        full, held = full.split(d.val_split, seed=SPLIT_SEED)
    drawn = full.split(d.train_images, seed=d.seed)[1] if d.train_images and d.train_images < len(full) else full
    return BenchData(drawn, held, test) if held is not None else BenchData(drawn, test, test)


def load_base(cfg: BenchConfig) -> nn.Module:
    """The base model: pretrained:NAME (sha256 checked), a saved model folder or a run directory."""
    from kdprune.models.pretrained import PREFIX, pretrained_dir

    path = pretrained_dir(cfg.base) if cfg.base.startswith(PREFIX) else Path(cfg.base)
    for cand in (path, path / "model"):
        if (cand / "structure.json").is_file():
            return load_pruned(cand)
    raise FileNotFoundError(f"base {cfg.base}: no saved model (structure.json) there or in its model/ folder")


def _spec(cfg: BenchConfig, m: BenchMethod, t: Target, seed: int) -> RunSpec:
    recipe = configure(m.recipe, t, seed, cfg.budget, cfg.progress)
    return RunSpec(f"{m.label}-{target_label(t)}-s{seed}", m.label, recipe, t, seed)


def grid(cfg: BenchConfig, seed: int) -> list[RunSpec]:
    """The equal-epoch runs of one seed, target-major."""
    targets = list(dict.fromkeys(t for m in cfg.methods for t in cfg.targets_of(m)))
    return [_spec(cfg, m, t, seed) for t in targets for m in cfg.methods if t in cfg.targets_of(m)]


def _find(lines: list[dict], label: str, t: Target, seed: int) -> dict | None:
    for r in lines:
        if (r.get("method"), r.get("budget"), r.get("target_metric"), r.get("target_value"), r.get("seed")) == \
                (label, EQUAL_EPOCHS, t.metric, t.value, seed) and "error" not in r:
            return r
    return None


def wall_runs(cfg: BenchConfig, lines: list[dict], seed: int) -> list[RunSpec]:
    """Equal wall time: each baseline fine-tunes for as many epochs as fit in the reference's
    measured wall time (from its own seconds per epoch), never fewer than at equal epochs; only
    at ``equal_wall.targets`` (all when None) and where both equal-epoch lines of this target and
    seed are in the results."""
    if cfg.equal_wall is None:
        return []
    return _matched_runs(cfg, cfg.equal_wall, lines, seed, "wall_s", "wall", EQUAL_WALL)


def compute_runs(cfg: BenchConfig, lines: list[dict], seed: int) -> list[RunSpec]:
    """Equal training compute (issue 36): as ``wall_runs``, by counted ``train_flops`` instead of
    measured seconds, for every ``equal_compute`` block."""
    return [s for ec in cfg.equal_compute
            for s in _matched_runs(cfg, ec, lines, seed, "train_flops", "compute", EQUAL_COMPUTE)]


def _matched_runs(cfg: BenchConfig, ew: Any, lines: list[dict], seed: int, key: str, tag: str,
                  budget: str) -> list[RunSpec]:
    """Each of ``ew.methods`` with as many fine-tune epochs as fit in the reference's ``key`` (from its
    own ``key`` per epoch at equal epochs), never fewer."""
    out = []
    for label in ew.methods:
        m = cfg.method(label)
        for t in cfg.targets_of(m):
            if ew.targets is not None and t not in ew.targets:
                continue
            ref, own = _find(lines, ew.reference, t, seed), _find(lines, label, t, seed)
            if ref is None or own is None or not ref.get(key) or not own.get(key):
                continue
            epochs = max(own["epochs"], math.floor(ref[key] / (own[key] / own["epochs"])))
            base = _spec(cfg, m, t, seed)
            ft = base.recipe.finetune
            recipe = replace(base.recipe, finetune=replace(ft, epochs=ft.epochs + epochs - own["epochs"]))
            out.append(RunSpec(f"{label}-{tag}-{ew.reference}-{target_label(t)}-s{seed}", label, recipe, t, seed,
                               budget, {"run": ref["run"], "method": ew.reference, key: ref[key]}))
    return out


def _epoch_rows(out: Path) -> list[dict[str, Any]]:
    """The epoch rows every training stage of a run logged (its metrics.jsonl files), resumes included."""
    return [json.loads(s) for p in sorted(out.rglob("metrics.jsonl")) for s in p.read_text().splitlines() if s.strip()]


def _epochs_trained(out: Path) -> int:
    """Epochs every training stage of a run logged, resumes included."""
    return len(_epoch_rows(out))


def _finished(out: Path) -> bool:
    """The run finished before its line was written: its report and its saved model are on disk."""
    return (out / "report.json").is_file() and (out / "model" / "structure.json").is_file()


def _earlier_seconds(out: Path) -> float:
    """Training seconds a killed earlier process spent on this run: its logged epochs (what it spent
    pruning, searching and on the unfinished epoch is lost, so a resumed wall time is a lower bound)."""
    if _finished(out):  # it is reused as it is: its report's wall time has it all
        return 0.0
    return float(sum(r.get("epoch_time_s", 0.0) for r in _epoch_rows(out))) if out.is_dir() else 0.0


class _Bench:
    """One invocation: config, data, base, the lines so far, and the provenance of new lines."""

    def __init__(self, cfg: BenchConfig, data: BenchData, command: str) -> None:
        self.cfg, self.data, self.base = cfg, data, load_base(cfg)
        self.device = str(resolve_device(cfg.budget.device or "auto"))
        self.machine = cfg.machine or describe_machine(cfg.budget.threads, self.device)
        self.command, self.new = command, []
        self._base_top1: float | None = None

    @property
    def lines(self) -> list[dict[str, Any]]:
        """The results so far, read afresh: another bench process may be appending to the file."""
        return read_lines(self.cfg.results)

    def done(self, tag: str) -> bool:
        return any(r.get("run") == tag for r in self.lines)

    @property
    def base_top1(self) -> float:
        if self._base_top1 is None:
            self._base_top1 = evaluate(self.base, self.data.test)["top1"]
        return self._base_top1

    def test_top1(self, model: nn.Module) -> float | None:
        """Test top-1, or None when the test set is the val set (compress already measured it)."""
        return evaluate(model, self.data.test)["top1"] if self.data.held_out else None

    def record(self, line: dict[str, Any]) -> dict[str, Any]:
        line = {**line, **provenance(self.machine, self.command)}
        append_line(self.cfg.results, line)
        self.new.append(line)
        return line


def _with_val(b: _Bench, line: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``line`` plus the model's top-1 on the held-out split, when there is one (not the test set)."""
    return {**line, "val_top1": evaluate(model, b.data.val)["top1"]} if b.data.held_out else line


def _base_line(b: _Bench) -> None:
    if b.done(BASE_RUN):
        return
    x = infer_example_input(b.data.train)
    c = complexity(b.base, example_input=x)
    b.record(_with_val(b, {
        "run": BASE_RUN, "method": BASE_LABEL, "recipe": "dense", "budget": "", "epochs": 0, "top1": b.base_top1,
        "flops_kept": 1.0, "params_kept": 1.0, "flops": c.flops, "params": c.params,
        "input_shape": list(x.shape[1:]), "data": b.data.train.name or b.cfg.data.name,
        "train_images": len(b.data.train),
        "val_images": len(b.data.val) if b.data.held_out else 0, "test_images": len(b.data.test)},
        b.base))


_RUN_FILE = "bench_run.json"
def _claim(out: Path, spec: RunSpec) -> None:
    """Mark ``out`` as this run's folder; refuse one left by another recipe (a changed config)."""
    mine, path = recipe_identity(spec.recipe), out / _RUN_FILE
    if path.is_file() and identity_changes(json.loads(path.read_text()), spec.recipe):
        raise ValueError(f"{out} holds run {spec.tag} of another recipe (the config changed since): delete "
                           f"that folder to rerun it, or give the method another label")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n")


def _compress(b: _Bench, spec: RunSpec, out: Path) -> tuple[dict, nn.Module]:
    """The run's report and model: reused when the run finished before its line was written."""
    if _finished(out):
        return json.loads((out / "report.json").read_text()), load_pruned(out / "model")
    res = compress(b.base, spec.recipe, b.data.train, b.data.val, out_dir=out, resume=True,
                   progress=b.cfg.progress, latency=False)
    return res.report, res.model


def _run_line(b: _Bench, spec: RunSpec) -> dict[str, Any]:
    out = b.cfg.runs / spec.tag
    resumed = out.is_dir() and any(p.name != _RUN_FILE for p in out.iterdir())
    line = {"run": spec.tag, "method": spec.label, "recipe": type(spec.recipe).__name__, "budget": spec.budget,
            "target_metric": spec.target.metric, "target_value": spec.target.value, "seed": spec.seed}
    if spec.reference is not None:
        line["reference"] = spec.reference
    _claim(out, spec)
    earlier_s = _earlier_seconds(out)
    try:
        rep, model = _compress(b, spec, out)
    except ValueError as e:  # an unreachable target (BudgetError) is a result too: the row says why
        return {**line, "error": str(e), "base_top1": b.base_top1}
    before, after = rep["before"], rep["after"]
    test = b.test_top1(model)
    line.update(epochs=_epochs_trained(out), top1=after["top1"] if test is None else test,
                flops_kept=round(after["flops"] / before["flops"], 4),
                params_kept=round(after["params"] / before["params"], 4),
                wall_s=round(rep["wall_time_s"] + earlier_s, 1), base_top1=b.base_top1, resumed=resumed,
                config=rep["recipe"])
    if "train_flops" in rep:  # counted (training/compute.py): the basis of "equal compute", never wall time
        line["train_flops"] = rep["train_flops"]
    if earlier_s:
        line["wall_earlier_s"] = round(earlier_s, 1)  # included in wall_s: epochs of the killed process
    if test is not None:
        line["val_top1"] = after["top1"]
    scored = "val_top1" if test is not None else "top1"  # what compress scored on: the held-out split if any
    for key in ("pruned", "recalibrated"):  # right after the removal step, before fine-tuning
        if key in rep:
            line[f"{key}_{scored}"] = rep[key]["top1"]
    return line


def _control(b: _Bench, seed: int) -> None:
    """The dense + same-epochs control: the base trained for the budget's epochs too."""
    cfg, budget = b.cfg, b.cfg.budget
    tag = f"{CONTROL}-e{budget.epochs}-s{seed}"
    if b.done(tag):
        return
    ft = default_finetune()
    ft = replace(ft, epochs=budget.epochs, optimizer=replace(ft.optimizer, lr=budget.lr or ft.optimizer.lr))
    tc = configure_stage(ft, seed, budget, cfg.progress)
    out, start = cfg.runs / tag, time.perf_counter()
    resumed = (out / "checkpoint.pt").is_file()
    earlier_s = _earlier_seconds(out)  # as a resumed compress run counts them
    res = train(copy.deepcopy(b.base), b.data.train, b.data.val, tc, out_dir=out, resume=resumed)
    top1 = evaluate(res.model, b.data.test)["top1"]
    line = {"run": tag, "method": CONTROL_LABEL, "recipe": "dense", "budget": EQUAL_EPOCHS, "seed": seed,
            "epochs": _epochs_trained(out), "top1": top1, "flops_kept": 1.0, "params_kept": 1.0,
            "wall_s": round(time.perf_counter() - start + earlier_s, 1), "base_top1": b.base_top1,
            "resumed": resumed, "config": to_tagged_dict(tc)}
    if earlier_s:
        line["wall_earlier_s"] = round(earlier_s, 1)
    b.record(_with_val(b, line, res.model))
    _say(b, tag, top1, 1.0, b.new[-1]["wall_s"])


def _say(b: _Bench, tag: str, top1: float | None, kept: float | None, wall: float | None) -> None:
    if top1 is None:
        print(f"kdprune bench: {tag}: failed: {b.new[-1].get('error')}", flush=True)
        return
    print(f"kdprune bench: {tag}: top-1 {top1:.2f}%, FLOPs kept {kept:.3f}, {wall:.0f} s", flush=True)


def _run_specs(b: _Bench, specs: Sequence[RunSpec]) -> None:
    for spec in specs:
        if b.done(spec.tag):
            continue
        print(f"kdprune bench: {spec.tag}: started {time.strftime('%H:%M:%S')}", flush=True)
        line = b.record(_run_line(b, spec))
        _say(b, spec.tag, line.get("top1"), line.get("flops_kept"), line.get("wall_s"))
        if spec.budget == EQUAL_EPOCHS and line.get("epochs") not in (None, b.cfg.budget.epochs):
            print(f"kdprune bench: warning: {spec.tag} trained {line['epochs']} epochs, the budget is "
                  f"{b.cfg.budget.epochs}: set its stage epochs in the config for equal epochs", flush=True)


def _selected(cfg: BenchConfig, only: Sequence[str] | None) -> set[str]:
    names = {m.label for m in cfg.methods} | {CONTROL}
    chosen = set(only) if only else names
    unknown = chosen - names
    if unknown:
        raise ValueError(f"--only {sorted(unknown)}: not in {cfg.name}; choose from {', '.join(sorted(names))}")
    return chosen


def _seeds(cfg: BenchConfig, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        return list(cfg.seeds)
    unknown = sorted(set(seeds) - set(cfg.seeds))
    if unknown:
        raise ValueError(f"--seeds {unknown}: not seeds of {cfg.name}; choose from {list(cfg.seeds)}")
    return [s for s in cfg.seeds if s in seeds]


def run_bench(cfg: BenchConfig, data: tuple[ImageDataset, ImageDataset] | None = None,
              only: Sequence[str] | None = None, command: str | None = None,
              seeds: Sequence[int] | None = None, equal_wall: bool = True) -> list[dict[str, Any]]:
    """Run every grid run whose line is not in ``cfg.results`` yet (``only``: these labels, and
    ``control``; ``seeds``: these of the config's seeds; ``equal_wall=False``: not the equal-wall
    runs, left to a later call), seed by seed; ``data`` = (train, test) replaces the named data
    set. Returns the lines appended."""
    import torch

    chosen, order = _selected(cfg, only), _seeds(cfg, seeds)
    if cfg.budget.threads:
        torch.set_num_threads(cfg.budget.threads)
    b = _Bench(cfg, prepare_data(cfg, data), command or "python " + " ".join(sys.argv))
    _base_line(b)
    for seed in order:
        _run_specs(b, [s for s in grid(cfg, seed) if s.label in chosen])
        if CONTROL in chosen:
            _control(b, seed)
        if equal_wall:
            _run_specs(b, [s for s in wall_runs(cfg, b.lines, seed) if s.label in chosen])
            _run_specs(b, [s for s in compute_runs(cfg, b.lines, seed) if s.label in chosen])
    return b.new
