"""KESI table on Fashion-MNIST: PFEC, PFEC + one-cycle, the snapshot ensemble and PFEC + KESI at
the same final size, against L1Finetune and KDFinetune (Le, Vo, Thoai, BMVC 2020's comparison).

    python benchmarks/kesi_fmnist.py --base runs/base-resnet20 --target-flops 0.5 --rounds 2 \
        --retrain-epochs 1 --distill-epochs 2

PFEC and KESI run the same L1 rounds towards the same final FLOPs; PFEC retrains each round at a
constant lr 1e-3, KESI with a one-cycle restart (max lr 0.1). "PFEC + one-cycle" is KESI's last
snapshot before distillation (KESI with distill_epochs=0 runs exactly those rounds), so it costs
nothing extra. L1Finetune/KDFinetune train for KESI's total epochs unless --baseline-epochs says
otherwise (the baseline table's runs are reused when there). Runs resume when killed; latency is
measured at the end, interleaved. Writes benchmarks/results/<name>.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
from pathlib import Path
from typing import Any

import kdprune as kp
from common import LATENCY_NOTE, add_latency, add_run_args, load_inputs, run_recipe, write_results


def ensemble_row(rep: dict, base_m: dict, run: Path, x: Any) -> dict:
    """The snapshot ensemble's accuracy (from the KESI report) and the summed size of its members."""
    members = rep["method"]["ensemble"]["members"]
    sizes = [base_m if m == "base" else
             kp.metrics.complexity(kp.load_pruned(run / m / "model"), example_input=x).as_dict()
             for m in members]
    return {"method": f"snapshot ensemble ({len(members)} members)", "top1": rep["method"]["ensemble"]["top1"],
            "params": sum(s["params"] for s in sizes), "flops": sum(s["flops"] for s in sizes),
            "note": "KESI's teacher: " + ", ".join(members)}


def plan(args: argparse.Namespace) -> tuple[list[tuple], int]:
    """(key, display name, run tag, recipe, total epochs) of every compared run; the rounds' epochs."""
    t, r, s = args.target_flops, args.rounds, args.seed
    rounds_epochs, total = r * args.retrain_epochs, r * args.retrain_epochs + args.distill_epochs
    common = dict(target_flops=t, rounds=r, retrain_epochs=args.retrain_epochs)
    base_epochs = args.baseline_epochs or total
    ft = kp.TrainConfig(epochs=base_epochs, optimizer=kp.SGD(lr=0.01), seed=s)
    rec = kp.recipes
    runs = [("PFEC", "PFEC", f"pfec-r{r}x{args.retrain_epochs}-f{t}-s{s}", rec.KESIPFEC(**common), rounds_epochs),
            ("KESI", "PFEC + KESI", f"kesi-r{r}x{args.retrain_epochs}-d{args.distill_epochs}-f{t}-s{s}",
             rec.KESI(**common, distill_epochs=args.distill_epochs), total),
            ("L1Finetune", "L1Finetune", f"l1finetune-e{base_epochs}-f{t}-s{s}",
             rec.L1Finetune(target_flops=t, finetune=ft), base_epochs),
            ("KDFinetune", "KDFinetune", f"kdfinetune-e{base_epochs}-f{t}-s{s}",
             rec.KDFinetune(target_flops=t, finetune=ft), base_epochs)]
    return runs, rounds_epochs


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-flops", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--retrain-epochs", type=int, default=1, help="per round, PFEC and KESI")
    p.add_argument("--distill-epochs", type=int, default=2)
    p.add_argument("--baseline-epochs", type=int, help="L1/KD fine-tune epochs (default: KESI's total)")
    add_run_args(p, "kesi_fmnist")
    p.add_argument("--only", nargs="+", choices=("PFEC", "KESI", "L1Finetune", "KDFinetune"),
                   help="run only these and write no table: to split the work over processes")
    return p.parse_args()


def main() -> None:
    """Run PFEC, KESI and the baselines (resuming), then interleaved latency; write the table."""
    args = parse_args()
    train, val, base = load_inputs(args)
    runs, rounds_epochs = plan(args)
    if args.only:
        for key, _, tag, recipe, _ in runs:
            if key in args.only:
                run_recipe(recipe, base, train, val, args.runs / tag)
        return
    r = args.rounds
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, val, x)
    rows = [{"method": "dense base", "key": "dense base", **base_m, "epochs": 0}]
    models = {"dense base": base}
    for _, name, tag, recipe, epochs in runs:
        rep, model = run_recipe(recipe, base, train, val, args.runs / tag)
        if model is None:
            rows.append({"method": name, "note": rep["error"][:120]})
            continue
        if name == "PFEC + KESI":
            snap = kp.load_pruned(args.runs / tag / f"round{r}" / "model")
            models["PFEC + one-cycle"] = snap
            rows += [{"method": "PFEC + one-cycle", "key": "PFEC + one-cycle", **kp.methods.measure(snap, val, x),
                      "epochs": rounds_epochs, "note": "KESI's last snapshot, before distillation"},
                     ensemble_row(rep, base_m, args.runs / tag, x)]
        models[name] = model
        rows.append({"method": name, "key": name, **rep["after"], "epochs": epochs, "wall_s": rep["wall_time_s"]})
    for row in rows:
        row["delta"] = row["top1"] - base_m["top1"] if "top1" in row else None
    add_latency(rows, models, base_m, tuple(x.shape[1:]))
    cols = {"method": "method", "top1": "top-1 %", "delta": "vs base", "params": "params",
            "flops": "FLOPs", "flops_kept": "FLOPs kept", "lat_bs64_ms": "CPU ms bs64",
            "speedup_bs64": "speed-up bs64", "speedup_bs1": "speed-up bs1", "epochs": "epochs",
            "wall_s": "wall s", "note": "note"}
    extra = {"seeds": 1, "base": str(args.base),
             "rounds": f"{r} L1 rounds to {args.target_flops} of FLOPs, {args.retrain_epochs} epoch(s) each; "
                       f"KESI: one-cycle max lr 0.1 SGD, then {args.distill_epochs} epochs Adam one-cycle 1e-3, "
                       "T=5, mean KL; PFEC: constant lr 1e-3",
             "baselines": "SGD lr 0.01 cosine for the epochs in the table", "latency": LATENCY_NOTE}
    print(open(write_results(args.name, rows, cols, extra)).read())


if __name__ == "__main__":
    main()
