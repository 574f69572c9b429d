"""OED (block pruning, online ensemble teacher) vs L1Finetune and KDFinetune on Fashion-MNIST.

    python benchmarks/oed_fmnist.py --only sweep &        # OED K=3 at each --lams (one core)
    python benchmarks/oed_fmnist.py --only baselines &    # L1/KD at equal epochs + dense control
    wait; python benchmarks/oed_fmnist.py --only k1 &     # K=1 ablation at the chosen lam
    python benchmarks/oed_fmnist.py --only walltime &     # L1/KD with OED's wall time
    wait; python benchmarks/oed_fmnist.py --report        # when the machine is quiet: latency + table

From the shipped base ``pretrained:resnet20-fmnist`` (option A, 9 residual blocks), on
``--train-images`` stratified training images, of which 5,000 are the validation split every run
makes its choices on (OED's best replica; since OED recipe v3 it carves nothing itself); the test
set is only reported. lam is chosen by the validation top-1 of the final pruned model, never the
test set. The baselines prune channels to the
same FLOPs target and fine-tune for the same epochs (equal epochs), or for as many epochs as fit in
OED's wall time (equal wall). Each finished run appends one line to
benchmarks/results/oed_fmnist_runs.jsonl at once (runs/ does not outlive a session).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import math
import time
from pathlib import Path

import torch

import kdprune as kp
from common import (LATENCY_NOTE, RESULTS, add_latency, append_jsonl, dense_control, group_lines, load_row_models,
                    mean_std, provenance, read_jsonl, run_recipe, subset_inputs, write_results)

BASE = "pretrained:resnet20-fmnist"
JSONL = RESULTS / "oed_fmnist_runs.jsonl"
MACHINE = "2-core CPU, 1 thread per run, two runs at once"


def _cfg(args: argparse.Namespace, epochs: int) -> kp.TrainConfig:
    return kp.TrainConfig(epochs=epochs, optimizer=kp.SGD(lr=0.01, weight_decay=2e-4),
                          schedule=kp.Step(milestones=(0.5, 0.75)), seed=args.seed, threads=args.threads)


def _oed(args: argparse.Namespace, lam: float, replicas: int) -> kp.recipes.OED:
    return kp.recipes.OED(replicas=replicas, lam=lam, mask_lr=args.mask_lr, target_flops=args.target,
                          finetune=_cfg(args, args.epochs))


def _lines(prefix: str = "") -> list[dict]:
    return [r for r in read_jsonl(JSONL) if r["run"].startswith(prefix)]


def best_lam(args: argparse.Namespace) -> float:
    """The swept lam whose final pruned model scores best on the held-out split (never the test set)."""
    if args.lam is not None:  # e.g. another seed with the lam seed 0's held-out sweep chose
        return args.lam
    sweep = [r for r in _lines("oed-k3-") if r["seed"] == args.seed and "held_top1" in r]
    if not sweep:
        raise SystemExit("run --only sweep first")
    return max(sweep, key=lambda r: (r["held_top1"], -r["lam"]))["lam"]


def grid(args: argparse.Namespace, part: str) -> dict[str, object]:
    """Run tag -> recipe for one part of the table."""
    s, t, r = args.seed, args.target, kp.recipes
    if part == "sweep":
        return {f"oed-k3-lam{lam}-s{s}": _oed(args, lam, args.replicas) for lam in args.lams}
    if part == "main":  # another seed at a given lam: OED K=3 and the equal-epoch baselines
        lam = best_lam(args)
        return {**grid(args, "baselines"), f"oed-k3-lam{lam}-s{s}": _oed(args, lam, args.replicas)}
    if part == "k1":
        return {f"oed-k1-lam{best_lam(args)}-s{s}": _oed(args, best_lam(args), 1)}
    if part == "baselines":
        return {f"l1finetune-{args.epochs}ep-s{s}": r.L1Finetune(target_flops=t, finetune=_cfg(args, args.epochs)),
                f"kdfinetune-{args.epochs}ep-s{s}": r.KDFinetune(target_flops=t, finetune=_cfg(args, args.epochs))}
    budget = next(x["wall_s"] for x in _lines(f"oed-k3-lam{best_lam(args)}-s{s}"))
    out = {}
    for name, cls in (("l1finetune", r.L1Finetune), ("kdfinetune", r.KDFinetune)):
        per_epoch = next(x["wall_s"] for x in _lines(f"{name}-{args.epochs}ep-s{s}")) / args.epochs
        ep = max(args.epochs, math.floor(budget / per_epoch))
        out[f"{name}-wall{ep}ep-s{s}"] = cls(target_flops=t, finetune=_cfg(args, ep))
    return out


def _line(args: argparse.Namespace, tag: str, rep: dict, held, model) -> dict:
    r, m = rep["recipe"], rep["method"]
    line = {"run": tag, "recipe": r["type"], "seed": args.seed, "target_flops": r["target_flops"],
            "epochs": r["finetune"]["epochs"], "top1": rep["after"]["top1"],
            "flops_kept": round(rep["after"]["flops"] / rep["before"]["flops"], 4),
            "params_kept": round(rep["after"]["params"] / rep["before"]["params"], 4),
            "wall_s": rep["wall_time_s"], "base_top1": rep["before"]["top1"]}
    if r["type"] == "OED":
        line.update(lam=r["lam"], replicas=r["replicas"], mask_lr=r["mask_lr"], removed_blocks=m["removed_blocks"],
                    zero_mask_blocks=m["zero_mask_blocks"],
                    masks=[round(v, 3) for v in m["masks"][m["selected_replica"]]],
                    replica_held_top1=m["replica_val_top1"], held_top1=kp.evaluate(model, held)["top1"])
    return {**line, **provenance(MACHINE)}


def run_part(args: argparse.Namespace, part: str, base, train, test) -> None:
    """Every run of one part (resumable, skipped when its line is committed)."""
    # the validation split every run makes its choices on (OED's replica since recipe v3; the test set
    # is only reported); runs committed before v3 held out OED's own 5,000 of the same images
    rest, held = train.split(5000, seed=args.seed)
    for tag, recipe in grid(args, part).items():
        if _lines(tag):
            continue
        rep, model = run_recipe(recipe, base, rest, held, args.runs / tag, test=test)
        if "after" not in rep:
            print("failed:", tag, rep, flush=True)
            continue
        append_jsonl(JSONL, _line(args, tag, rep, held, model))
        print(tag, rep["after"]["top1"], flush=True)
    if part == "baselines" and not _lines(f"dense-control-{args.epochs}ep-s{args.seed}"):
        start = time.perf_counter()
        top1 = dense_control(base, train, test, _cfg(args, args.epochs), args.runs / f"dense-s{args.seed}")
        append_jsonl(JSONL, {"run": f"dense-control-{args.epochs}ep-s{args.seed}", "recipe": "dense control",
                             "seed": args.seed, "epochs": args.epochs, "top1": top1,
                             "wall_s": round(time.perf_counter() - start, 1), **provenance(MACHINE)})


def _label(r: dict) -> str:
    if r["recipe"] == "OED":
        return f"OED K={r['replicas']} lam={r['lam']}"
    return f"{r['recipe']} ({r['epochs']} ep{', equal wall' if '-wall' in r['run'] else ''})"


def _aggregate(lines: list[dict]) -> list[dict]:
    """One row per run kind: test top-1 mean +- std over seeds and the means of the rest."""
    rows = []
    for rs in group_lines(lines, lambda r: r["run"].rsplit("-s", 1)[0]).values():
        mean = lambda k: round(sum(r[k] for r in rs) / len(rs), 4)  # noqa: E731
        row = {"method": _label(rs[0]), "top1": mean_std([r["top1"] for r in rs]), "epochs": rs[0]["epochs"],
               "wall_s": round(mean("wall_s")), "runs": [r["run"] for r in rs]}
        if "held_top1" in rs[0]:
            row.update(held_top1=mean("held_top1"), blocks_removed=", ".join(rs[0]["removed_blocks"]))
        rows.append(row)
    return rows


def report(args: argparse.Namespace, base, train, test) -> None:
    """Aggregate the committed JSONL; interleaved CPU latency of the models still in --runs."""
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, test, x)
    rows = [{"method": "dense base", "key": "dense base", **base_m, "top1": f"{base_m['top1']:.2f}"}]
    rows += _aggregate(read_jsonl(JSONL))
    models = {"dense base": base, **load_row_models(rows, [args.runs], x)}
    add_latency(rows, models, base_m, tuple(x.shape[1:]))
    cols = {"method": "method", "top1": "test top-1 % (mean ± std, seeds)", "held_top1": "held-out top-1 %",
            "flops_kept": "FLOPs kept", "params_kept": "params kept", "blocks_removed": "blocks removed",
            "epochs": "epochs", "wall_s": "wall s", "speedup_bs1": "speed-up bs1", "speedup_bs64": "speed-up bs64"}
    extra = {"base": BASE, "train images": args.train_images, "FLOPs target": args.target, "latency": LATENCY_NOTE,
             "schedule": "SGD lr 0.01 wd 2e-4, x0.1 at 50% and 75%", "mask_lr": args.mask_lr,
             "raw lines": "benchmarks/results/oed_fmnist_runs.jsonl"}
    print(open(write_results("oed_fmnist", rows, cols, extra)).read())


def main() -> None:
    """Run parts of the grid, or the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["sweep", "baselines", "k1", "walltime", "main"],
                   default=["sweep", "baselines", "k1", "walltime"])
    p.add_argument("--target", type=float, default=0.65, help="FLOPs kept (3 of 9 blocks)")
    p.add_argument("--lams", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--lam", type=float, help="skip the sweep's choice: use this lam (other seeds)")
    p.add_argument("--mask-lr", type=float, default=0.1)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs/oed_fmnist"))
    p.add_argument("--report", action="store_true")
    p.add_argument("--jsonl", type=Path, default=JSONL, help="where finished runs' lines go (smoke runs: elsewhere)")
    args = p.parse_args()
    globals()["JSONL"] = args.jsonl
    torch.set_num_threads(args.threads)
    train, test, base = subset_inputs(args.train_images, args.seed, BASE)
    if args.report:
        report(args, base, train, test)
        return
    for part in args.only:
        run_part(args, part, base, train, test)


if __name__ == "__main__":
    main()
