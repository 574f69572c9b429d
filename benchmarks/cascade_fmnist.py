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
import json
import math
from pathlib import Path

import kdprune as kp
from common import LATENCY_NOTE, add_latency, dense_control, run_recipe, write_results

BASE = "pretrained:resnet20-fmnist"


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


def _report(runs: Path, name: str, t: float, seed: int) -> dict | None:
    f = runs / _tag(name, t, seed) / "report.json"
    return json.loads(f.read_text()) if f.is_file() else None


def walltime_recipes(args: argparse.Namespace, t: float) -> dict[str, object]:
    """L1Finetune and KDFinetune with as many epochs as fit in Cascade (2 TA)'s wall time."""
    budget = _report(args.runs, "Cascade (2 TA)", t, args.seed)
    if budget is None:
        raise SystemExit(f"run the equal-epoch grid at target {t} first")
    out, total = {}, args.cascade_epochs + args.finetune_epochs
    for name, cls in (("L1Finetune", kp.recipes.L1Finetune), ("KDFinetune", kp.recipes.KDFinetune)):
        per_epoch = _report(args.runs, name, t, args.seed)["wall_time_s"] / total
        epochs = max(total, math.floor(budget["wall_time_s"] / per_epoch))
        out[f"{name} (equal wall, {epochs} ep)"] = cls(target_flops=t, finetune=_cfg(args, epochs))
    return out


def run_grid(args: argparse.Namespace, base, train, test) -> None:
    """The asked phase at the asked targets (each run resumable, reused when finished)."""
    for t in args.targets:
        grid = walltime_recipes(args, t) if args.walltime else equal_epoch_recipes(args, t)
        for name, recipe in grid.items():
            rep, _ = run_recipe(recipe, base, train, test, args.runs / _tag(name, t, args.seed))
            print(name, t, rep.get("after", rep), flush=True)
    if not args.walltime and 0.5 in args.targets:
        dense_control(base, train, test, _cfg(args, args.cascade_epochs + args.finetune_epochs),
                      args.runs / f"dense-control-s{args.seed}")


def report(args: argparse.Namespace, base, train, test) -> None:
    """Gather every finished run, measure latency, write the table."""
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, test, x)
    rows, models = [{"method": "dense base", "key": "dense base", "target": 1.0, **base_m}], {"dense base": base}
    total = args.cascade_epochs + args.finetune_epochs
    ctrl = dense_control(base, train, test, _cfg(args, total), args.runs / f"dense-control-s{args.seed}")
    rows.append({"method": f"dense + {total} epochs (control)", "target": 1.0, **base_m, "top1": ctrl})
    for d in sorted(p for p in args.runs.iterdir() if (p / "report.json").is_file()):
        rep = json.loads((d / "report.json").read_text())
        key = d.name
        models[key] = kp.load_pruned(d / "model")
        kept = rep["method"].get("flops_kept")
        rows.append({"method": _label(rep), "key": key, "target": rep["recipe"]["target_flops"], **rep["after"],
                     "epochs": _epochs(rep["recipe"]), "wall_s": rep["wall_time_s"],
                     "assistant_flops": [round(k, 3) for k in kept[:-1]] if isinstance(kept, list) else ""})
    add_latency(rows, models, base_m, tuple(x.shape[1:]))
    cols = {"method": "method", "target": "FLOPs target", "top1": "test top-1 %", "flops_kept": "FLOPs kept",
            "params_kept": "params kept", "epochs": "epochs", "wall_s": "wall s", "speedup_bs1": "speed-up bs1",
            "speedup_bs64": "speed-up bs64", "assistant_flops": "TA FLOPs kept"}
    extra = {"seeds": 1, "base": BASE, "train images": args.train_images, "latency": LATENCY_NOTE,
             "schedule": "SGD lr 0.01 cosine per stage"}
    print(open(write_results("cascade_fmnist", rows, cols, extra)).read())


def _label(rep: dict) -> str:
    r = rep["recipe"]
    if r["type"] == "Cascade":
        return f"Cascade ({r['assistants']} TA)"
    return f"{r['type']} ({r['finetune']['epochs']} ep)"


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
    full, test = kp.data.load("fashion-mnist")
    train = full.split(args.train_images, seed=args.seed)[1]  # a stratified, seeded subset
    base = kp.pretrained(BASE)
    (report if args.report else run_grid)(args, base, train, test)


if __name__ == "__main__":
    main()
