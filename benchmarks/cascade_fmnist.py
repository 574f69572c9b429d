"""Cascade with 0, 1 and 2 teaching assistants vs L1Finetune and KDFinetune on Fashion-MNIST.

    python benchmarks/cascade_fmnist.py --targets 0.5 --threads 1 &     # one core each
    python benchmarks/cascade_fmnist.py --targets 0.25 --threads 1 &
    wait; python benchmarks/cascade_fmnist.py --walltime --targets 0.5 --threads 1 &
    python benchmarks/cascade_fmnist.py --walltime --targets 0.25 --threads 1 &
    wait; python benchmarks/cascade_fmnist.py --report                   # when the machine is quiet

All runs start from the shipped base ``pretrained:resnet20-fmnist`` (option A) and train on
``--train-images`` images drawn (stratified, seeded) from the training set; the test set is only
reported. Equal epochs: Cascade trains ``--cascade-epochs`` with its chain, then fine-tunes the
student ``--finetune-epochs``; each baseline fine-tunes for the sum. Equal wall time (--walltime):
each baseline gets as many epochs as fit in the wall time of Cascade with 2 assistants at the same
target (from its own measured seconds per epoch). The dense control trains the base for the same
epochs. Runs resume and are reused; --report measures interleaved CPU latency and writes
benchmarks/results/cascade_fmnist.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import math
import time
from pathlib import Path

import kdprune as kp
from common import (LATENCY_NOTE, RESULTS, add_latency, append_jsonl, dense_control, group_lines, load_row_models,
                    mean_std, provenance, read_jsonl, run_recipe, subset_inputs, write_results)

BASE = "pretrained:resnet20-fmnist"
JSONL = RESULTS / "cascade_fmnist_runs.jsonl"
MACHINE = "2-core CPU, 1 thread per run, two runs at once"


def _cfg(args: argparse.Namespace, epochs: int) -> kp.TrainConfig:
    return kp.TrainConfig(epochs=epochs, optimizer=kp.SGD(lr=0.01), seed=args.seed, threads=args.threads)


def equal_epoch_recipes(args: argparse.Namespace, t: float) -> dict[str, object]:
    """Every method at target t with the same number of training epochs."""
    r, total = kp.recipes, args.cascade_epochs + args.finetune_epochs
    out = {"L1Finetune": r.L1Finetune(target_flops=t, finetune=_cfg(args, total)),
           "KDFinetune": r.KDFinetune(target_flops=t, finetune=_cfg(args, total))}
    for a in (0, 1, 2):
        out[f"Cascade ({a} TA)"] = r.Cascade(target_flops=t, assistants=a, cascade=_cfg(args, args.cascade_epochs),
                                             finetune=_cfg(args, args.finetune_epochs), prune_every=args.prune_every)
    return out


def _tag(name: str, t: float, seed: int) -> str:
    return f"{name.lower().replace(' ', '').replace('(', '-').replace(')', '')}-f{t}-s{seed}"


def _wall(tag: str) -> float | None:
    """A finished run's wall seconds, from the committed JSONL (runs/ does not outlive a session)."""
    return next((r["wall_s"] for r in read_jsonl(JSONL) if r["run"] == tag), None)


def walltime_recipes(args: argparse.Namespace, t: float) -> dict[str, object]:
    """L1Finetune and KDFinetune with as many epochs as fit in Cascade (2 TA)'s wall time."""
    budget = _wall(_tag("Cascade (2 TA)", t, args.seed))
    if budget is None:
        raise SystemExit(f"run the equal-epoch grid at target {t}, seed {args.seed} first")
    out, total = {}, args.cascade_epochs + args.finetune_epochs
    for name, cls in (("L1Finetune", kp.recipes.L1Finetune), ("KDFinetune", kp.recipes.KDFinetune)):
        per_epoch = _wall(_tag(name, t, args.seed)) / total
        epochs = max(total, math.floor(budget / per_epoch))
        out[f"{name} (equal wall, {epochs} ep)"] = cls(target_flops=t, finetune=_cfg(args, epochs))
    return out


def _record(args: argparse.Namespace, tag: str, rep: dict, phase: str) -> None:
    """Commit-ready: one JSONL line per finished run, written as soon as it finishes."""
    if "after" not in rep:
        print("failed:", tag, rep, flush=True)
        return
    r = rep["recipe"]
    append_jsonl(JSONL, {
        "run": tag, "recipe": r["type"], "assistants": r.get("assistants"), "target_flops": r["target_flops"],
        "epochs": _epochs(r), "phase": phase, "seed": args.seed, "top1": rep["after"]["top1"],
        "flops_kept": round(rep["after"]["flops"] / rep["before"]["flops"], 4),
        "params_kept": round(rep["after"]["params"] / rep["before"]["params"], 4), "wall_s": rep["wall_time_s"],
        "base_top1": rep["before"]["top1"], **provenance(MACHINE)})


def run_grid(args: argparse.Namespace, base, train, test) -> None:
    """The asked phase at the asked targets (each run resumable, reused when finished)."""
    for t in args.targets:
        grid = walltime_recipes(args, t) if args.walltime else equal_epoch_recipes(args, t)
        for name, recipe in grid.items():
            tag = _tag(name, t, args.seed)
            if _wall(tag) is not None:
                continue  # committed already
            rep, _ = run_recipe(recipe, base, train, test, args.runs / tag)
            _record(args, tag, rep, "equal wall" if args.walltime else "equal epochs")
    if not args.walltime and 0.5 in args.targets and _wall(f"dense-control-s{args.seed}") is None:
        start = time.perf_counter()
        top1 = dense_control(base, train, test, _cfg(args, args.cascade_epochs + args.finetune_epochs),
                             args.runs / f"dense-control-s{args.seed}")
        append_jsonl(JSONL, {"run": f"dense-control-s{args.seed}", "recipe": "dense control", "seed": args.seed,
                             "epochs": args.cascade_epochs + args.finetune_epochs, "top1": top1,
                             "wall_s": round(time.perf_counter() - start, 1), **provenance(MACHINE)})


def _label(r: dict) -> str:
    if r["recipe"] == "Cascade":
        return f"Cascade ({r['assistants']} TA)"
    return f"{r['recipe']} ({r.get('epochs', 3)} ep)"


def _aggregate(lines: list[dict]) -> list[dict]:
    """One row per (method, target): test top-1 mean +- std over seeds, mean wall time and kept sizes."""
    def key(r: dict) -> tuple:
        if r["recipe"] != "dense control" and r.get("phase") == "equal wall":
            return r["recipe"] + " (equal wall)", r["target_flops"]
        return _label(r), r.get("target_flops", 1.0)

    groups, rows = group_lines(lines, key), []
    for (label, t), rs in sorted(groups.items(), key=lambda kv: (-(kv[0][1] or 1), kv[0][0])):
        mean = lambda k: round(sum(r[k] for r in rs) / len(rs), 4)  # noqa: E731
        row = {"method": label, "target": t, "top1": mean_std([r["top1"] for r in rs]), "seeds": len(rs),
               "epochs": "/".join(sorted({str(r.get("epochs", 3)) for r in rs})), "wall_s": round(mean("wall_s")),
               "runs": [r["run"] for r in rs]}
        if "flops_kept" in rs[0]:
            row.update(flops_kept=mean("flops_kept"), params_kept=mean("params_kept"))
        rows.append(row)
    return rows


def report(args: argparse.Namespace, base, train, test) -> None:
    """Aggregate the committed JSONL over seeds; interleaved CPU latency of the models still in --runs."""
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, test, x)
    rows = [{"method": "dense base", "key": "dense base", "target": 1.0, **base_m, "top1": f"{base_m['top1']:.2f}",
             "runs": []}] + _aggregate(read_jsonl(JSONL))
    models = {"dense base": base, **load_row_models(rows, [args.runs], x)}
    add_latency(rows, models, base_m, tuple(x.shape[1:]))
    cols = {"method": "method", "target": "FLOPs target", "top1": "test top-1 % (mean ± std, seeds)",
            "flops_kept": "FLOPs kept", "params_kept": "params kept", "epochs": "epochs", "wall_s": "wall s",
            "speedup_bs1": "speed-up bs1", "speedup_bs64": "speed-up bs64"}
    extra = {"base": BASE, "train images": args.train_images, "latency": LATENCY_NOTE,
             "schedule": "SGD lr 0.01 cosine per stage", "raw lines": "benchmarks/results/cascade_fmnist_runs.jsonl"}
    print(open(write_results("cascade_fmnist", rows, cols, extra)).read())


def _epochs(r: dict) -> int:
    return r["finetune"]["epochs"] + (r["cascade"]["epochs"] if "cascade" in r else 0)


def main() -> None:
    """Run a phase of the grid, or the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--cascade-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--prune-every", type=int, default=10)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs/cascade_fmnist"))
    p.add_argument("--walltime", action="store_true", help="the equal-wall-time baselines")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    train, test, base = subset_inputs(args.train_images, args.seed, BASE)
    (report if args.report else run_grid)(args, base, train, test)


if __name__ == "__main__":
    main()
