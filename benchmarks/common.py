"""Helpers shared by the benchmark scripts (public API only): runs that resume, latency, result files."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import kdprune as kp
from kdprune.metrics import format_markdown
from kdprune.utils.meta import run_metadata, write_json

RESULTS = Path(__file__).parent / "results"
LATENCY_NOTE = "median of 15 interleaved rounds, 2 threads; speed-up = base median / model median"


def add_run_args(p: argparse.ArgumentParser, name: str) -> None:
    """The options every pruning table shares: base run, runs folder, seed, smoke subset, file name."""
    p.add_argument("--base", type=Path, default=Path("runs/base-resnet20"), help="kdprune train run to start from")
    p.add_argument("--runs", type=Path, default=Path("runs/baselines"), help="where the compress runs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, nargs=2, metavar=("TRAIN", "VAL"), help="smoke runs only")
    p.add_argument("--name", default=name, help="results file name")


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(train, val, base model) for a table: Fashion-MNIST (subset if asked) and the base run's model."""
    train, val = kp.data.load("fashion-mnist")
    if args.subset:
        train, val = train.subset(args.subset[0]), val.subset(args.subset[1])
    return train, val, kp.load_pruned(args.base / "model")


def run_recipe(recipe: Any, base: Any, train: Any, val: Any, out: Path, test: Any = None) -> tuple[dict, Any]:
    """Compress (resuming a killed run, reusing a finished one); returns (report, model). ``test``: a
    held-apart set the report scores on (``val`` then only makes the run's choices)."""
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text()), kp.load_pruned(out / "model")
    try:
        res = kp.compress(base, recipe, train, val, out_dir=out, resume=True, latency=False, test=test)
    except ValueError as e:  # e.g. a round_to grid that cannot meet the target within 1%
        return {"error": str(e)}, None
    return res.report, res.model


def dense_control(base: Any, train: Any, val: Any, ft: kp.TrainConfig, out: Path) -> float:
    """Top-1 of the dense base trained for the fine-tune epochs too (the control)."""
    res = kp.train(copy.deepcopy(base), train, val, ft, out_dir=out, resume=(out / "checkpoint.pt").is_file())
    return kp.evaluate(res.model, val)["top1"]


def add_latency(rows: list[dict[str, Any]], models: dict[str, Any], base_m: dict[str, float],
                shape: tuple[int, ...]) -> None:
    """Interleaved CPU latency of every model; fills kept fractions and speed-ups into rows with a key."""
    lat = kp.metrics.compare_latency(models, shape, batch_sizes=(1, 64), threads=2, rounds=15)
    for row in (r for r in rows if r.get("key") in lat):
        key = row["key"]
        row.update(flops_kept=row["flops"] / base_m["flops"], params_kept=row["params"] / base_m["params"],
                   lat_bs1_ms=lat[key][1]["median_ms"], lat_bs64_ms=lat[key][64]["median_ms"],
                   speedup_bs64=lat[key][64]["speedup"], speedup_bs1=lat[key][1]["speedup"])


def write_results(name: str, rows: list[dict[str, Any]], columns: dict[str, str], extra: dict | None = None) -> Path:
    """Write results/<name>.json (rows + command + metadata) and results/<name>.md (table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python " + " ".join(sys.argv), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "meta": run_metadata(), **(extra or {}), "rows": rows}
    write_json(RESULTS / f"{name}.json", payload)
    md = [f"# {name}", "", f"Command: `{payload['command']}`  ", f"Commit: `{payload['meta']['git_commit']}`, "
          f"torch {payload['meta']['torch']}, {payload['meta']['cpu_count']} CPU cores", "",
          format_markdown(rows, columns), ""]
    for k, v in (extra or {}).items():
        md.append(f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    return RESULTS / f"{name}.md"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a committed results JSONL (empty when the file does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


def append_jsonl(path: Path, line: dict[str, Any], key: str = "run") -> bool:
    """Append one finished run's line unless a line with the same key is there; True if written."""
    if any(r.get(key) == line[key] for r in read_jsonl(path)):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return True


def mean_std(values: list[float]) -> str:
    """'m +- s (n)' over seeds, or the single value when there is one."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    m = sum(values) / len(values)
    s = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.2f} ± {s:.2f} ({len(values)})"


def provenance(machine: str) -> dict[str, Any]:
    """What every committed result line carries: commit, machine and the command that made it."""
    return {"commit": run_metadata()["git_commit"], "machine": machine, "command": "python " + " ".join(sys.argv)}


def load_row_models(rows: list[dict[str, Any]], folders: list[Path], example: Any) -> dict[str, Any]:
    """For each row, the first of its ``runs`` (popped) whose model is still in one of ``folders``:
    loaded, measured into the row, keyed for add_latency (any seed: same target, same size)."""
    models = {}
    for row in rows:
        dirs = [f / tag / "model" for tag in row.pop("runs", []) for f in folders]
        d = next((d for d in dirs if d.is_dir()), None)
        if d is not None:
            models[d.parent.name], row["key"] = kp.load_pruned(d), d.parent.name
            row.update(kp.metrics.complexity(models[d.parent.name], example_input=example).as_dict())
    return models


def group_lines(lines: list[dict[str, Any]], key: Any) -> dict[Any, list[dict[str, Any]]]:
    """Result lines grouped by ``key(line)`` (e.g. method and target, across seeds), in first-seen order."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in lines:
        groups.setdefault(key(r), []).append(r)
    return groups


def subset_inputs(train_images: int, seed: int, base: str) -> tuple[Any, Any, Any]:
    """(train subset, test set, base model) of the Fashion-MNIST grids: ``train_images`` rows drawn
    per class (stratified, seeded) from the training set, the shipped base ``base``."""
    full, test = kp.data.load("fashion-mnist")
    return full.split(train_images, seed=seed)[1], test, kp.pretrained(base)
