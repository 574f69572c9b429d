"""Baseline pruning table on Fashion-MNIST: L1Finetune, GroupNorm, KDFinetune vs the dense base.

    python benchmarks/baselines_fmnist.py --base runs/base-resnet20 --targets 0.5 0.3 --epochs 4

Every method starts from the same base and fine-tunes for the same epochs; the control is the
dense base trained for those extra epochs with the same fine-tune schedule. Runs go to
runs/baselines/<name> and resume when killed; latency of all models is measured at the end,
interleaved. Writes benchmarks/results/baselines_fmnist.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse

import kdprune as kp
from common import (LATENCY_NOTE, add_latency, add_run_args, dense_control, load_inputs, run_recipe,
                    write_results)


def recipes(target: float, ft: kp.TrainConfig, sparse_epochs: int, round_to: bool) -> dict[str, object]:
    """The compared recipes at one FLOPs target (same fine-tune config for all)."""
    r = kp.recipes
    rounded = {"L1Finetune (round_to=8)": r.L1Finetune(target_flops=target, finetune=ft, round_to=8,
                                                       mode=kp.engine.Global())} if round_to else {}
    return {"L1Finetune": r.L1Finetune(target_flops=target, finetune=ft), **rounded,
            "GroupNorm": r.GroupNorm(target_flops=target, finetune=ft,
                                     sparse=kp.TrainConfig(epochs=sparse_epochs, optimizer=kp.SGD(lr=0.01))),
            "KDFinetune": r.KDFinetune(target_flops=target, finetune=ft)}


def main() -> None:
    """Run every recipe at every target, the control, then interleaved latency; write the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--epochs", type=int, default=4, help="fine-tune epochs (all methods and the control)")
    p.add_argument("--sparse-epochs", type=int, default=2, help="GroupNorm sparse-training epochs")
    p.add_argument("--round-to-targets", type=float, nargs="*", default=[0.5],
                   help="targets at which L1Finetune also runs with round_to=8 (latency effect)")
    add_run_args(p, "baselines_fmnist")
    args = p.parse_args()
    train, val, base = load_inputs(args)
    ft = kp.TrainConfig(epochs=args.epochs, optimizer=kp.SGD(lr=0.01), seed=args.seed)
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, val, x)
    rows = [{"method": "dense base", "key": "dense base", "target": 1.0, **base_m, "extra_epochs": 0}]
    rows.append({"method": "dense + same extra epochs (control)", "target": 1.0, **base_m,
                 "top1": dense_control(base, train, val, ft, args.runs / "dense-control"),
                 "extra_epochs": args.epochs})
    models = {"dense base": base}
    for t in args.targets:
        for name, recipe in recipes(t, ft, args.sparse_epochs, t in args.round_to_targets).items():
            tag = name.lower().replace(" ", "").replace("(", "-").replace(")", "").replace("=", "")
            rep, model = run_recipe(recipe, base, train, val, args.runs / f"{tag}-f{t}-s{args.seed}")
            if model is None:
                rows.append({"method": name, "target": t, "note": rep["error"][:120]})
                continue
            models[f"{name} @{t}"] = model
            rows.append({"method": name, "key": f"{name} @{t}", "target": t, **rep["after"],
                         "wall_s": rep["wall_time_s"],
                         "extra_epochs": args.epochs + (args.sparse_epochs if name == "GroupNorm" else 0)})
    add_latency(rows, models, base_m, tuple(x.shape[1:]))
    cols = {"method": "method", "target": "FLOPs target", "top1": "top-1 %", "params": "params",
            "flops": "FLOPs", "flops_kept": "FLOPs kept", "lat_bs64_ms": "CPU ms bs64",
            "speedup_bs64": "speed-up bs64", "speedup_bs1": "speed-up bs1", "extra_epochs": "extra epochs",
            "wall_s": "wall s", "note": "note"}
    extra = {"seeds": 1, "base": str(args.base), "finetune": f"{args.epochs} epochs SGD lr 0.01 cosine",
             "latency": LATENCY_NOTE}
    print(open(write_results(args.name, rows, cols, extra)).read())


if __name__ == "__main__":
    main()
