"""What the loop's parameter groups change: SDAP and L1Finetune at 25% of params, with weight decay
on conv/linear weights only (the new default) vs on every parameter (`weight_decay_1d=True`, the
single-group behaviour every earlier table was made with), from the same base, same 4 epochs.

    python benchmarks/param_groups_fmnist.py --base runs/base-resnet20 --runs runs/pg
    python benchmarks/param_groups_fmnist.py ... --only sdap-new     # split runs over processes

Writes benchmarks/results/param_groups_fmnist.{json,md}. One seed.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse

import kdprune as kp
from common import add_run_args, load_inputs, run_recipe, write_results

VARIANTS = {"new": False, "old": True}  # tag -> weight_decay_1d


def recipes(epochs: int, ramp: float) -> dict[str, tuple[str, str, object]]:
    """tag -> (method, weight decay on, recipe)."""
    out = {}
    for tag, wd1d in VARIANTS.items():
        ft = kp.TrainConfig(epochs=epochs, optimizer=kp.SGD(lr=0.01), weight_decay_1d=wd1d)
        on = "every parameter" if wd1d else "conv/linear weights"
        out[f"sdap-{tag}"] = ("SDAP", on, kp.recipes.SDAP(target_params=0.25, finetune=ft, ramp_epochs=ramp))
        out[f"l1-{tag}"] = ("L1Finetune", on, kp.recipes.L1Finetune(target_params=0.25, finetune=ft))
    return out


def main() -> None:
    """Run the chosen runs (resuming); without --only, write the table from all of them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--ramp-epochs", type=float, default=2.0)
    p.add_argument("--only", nargs="+", metavar="TAG", help="run only these (sdap-new, sdap-old, l1-new, l1-old)")
    add_run_args(p, "param_groups_fmnist")
    args = p.parse_args()
    train, val, base = load_inputs(args)
    chosen = recipes(args.epochs, args.ramp_epochs)
    tags = args.only or list(chosen)
    if unknown := set(tags) - set(chosen):
        raise SystemExit(f"unknown tags {sorted(unknown)}; known: {list(chosen)}")
    base_top1 = kp.evaluate(base, val)["top1"]
    rows = [{"method": "dense base", "decay": "-", "top1": base_top1}]
    for tag in tags:
        name, on, recipe = chosen[tag]
        rep, _ = run_recipe(recipe, base, train, val, args.runs / f"{tag}-s{args.seed}")
        rows.append({"method": name, "decay": on, "top1": rep["after"]["top1"],
                     "delta": rep["after"]["top1"] - base_top1,
                     "params_kept": rep["after"]["params"] / rep["before"]["params"],
                     "flops_kept": rep["after"]["flops"] / rep["before"]["flops"], "wall_s": rep["wall_time_s"]})
    if args.only:
        return
    cols = {"method": "method", "decay": "weight decay on", "top1": "top-1 %", "delta": "vs base",
            "params_kept": "params kept", "flops_kept": "FLOPs kept", "wall_s": "wall s"}
    extra = {"seeds": 1, "base": str(args.base), "training": f"{args.epochs} epochs SGD lr 0.01 wd 5e-4 cosine; "
             f"SDAP ramp {args.ramp_epochs} epochs, T=4, alpha=0.9"}
    print(open(write_results(args.name, rows, cols, extra)).read())


if __name__ == "__main__":
    main()
