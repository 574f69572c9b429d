"""SDAP table on Fashion-MNIST: SDAP vs L1Finetune and KDFinetune at the same total epochs, plus
the ablations (no distillation, uniform per-layer rates) and a per-layer width plot.

    python benchmarks/sdap_fmnist.py --base runs/base-resnet20 --epochs 4 --ramp-epochs 2

Every method starts from the same base (the one of baselines_fmnist.md) and trains for the same
total epochs with the same optimiser and schedule; SDAP's ramp is part of those epochs. Runs go to
<runs>/<tag>-s<seed> (the baseline table's L1/KD runs at 50% FLOPs are reused when there) and resume
when killed; latency is measured at the end, interleaved. Writes
benchmarks/results/sdap_fmnist.{json,md} and sdap_widths_fmnist.png.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
from pathlib import Path

import kdprune as kp
from common import (LATENCY_NOTE, RESULTS, add_latency, add_run_args, dense_control, load_inputs, run_recipe,
                    write_results)

TARGETS = (("params", 0.25), ("flops", 0.5))


def recipes(ft: kp.TrainConfig, ramp: float) -> list[tuple[str, str, str, object]]:
    """(method, target label, run tag, recipe): main comparison at both targets, then ablations."""
    r = kp.recipes
    out = []
    for kind, t in TARGETS:
        tgt, key = {f"target_{kind}": t}, f"{kind[0]}{t}"
        label = f"{kind} {t:.2f}"
        out += [("SDAP", label, f"sdap-{key}", r.SDAP(**tgt, finetune=ft, ramp_epochs=ramp)),
                ("L1Finetune", label, f"l1finetune-{key}", r.L1Finetune(**tgt, finetune=ft)),
                ("KDFinetune", label, f"kdfinetune-{key}", r.KDFinetune(**tgt, finetune=ft))]
    label = "params 0.25"
    out += [("SDAP, alpha=0 (no KD)", label, "sdap-alpha0-p0.25",
             r.SDAP(target_params=0.25, finetune=ft, ramp_epochs=ramp, alpha=0.0)),
            ("SDAP, uniform rates", label, "sdap-uniform-p0.25",
             r.SDAP(target_params=0.25, finetune=ft, ramp_epochs=ramp, mode=kp.engine.Uniform()))]
    return out


def plot_widths(reports: dict[str, dict], path: Path) -> None:
    """Bar chart of each pruned layer's kept fraction of output channels, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = next(iter(reports.values()))["widths"]["before"]
    layers = [k for k in before if any(rep["widths"]["after"].get(k) != before[k] for rep in reports.values())]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(layers)), 4.2))
    width = 0.8 / len(reports)
    for i, (name, rep) in enumerate(reports.items()):
        kept = [rep["widths"]["after"].get(k, 0) / before[k] for k in layers]
        ax.bar([j + i * width for j in range(len(layers))], kept, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels([f"{k}\n({before[k]})" for k in layers], rotation=90, fontsize=7)
    ax.set_ylabel("output channels kept (fraction of dense)")
    ax.set_ylim(0, 1.05)
    ax.set_title("ResNet-20 on Fashion-MNIST, 25% of params kept: where each method took channels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup(args: argparse.Namespace) -> tuple:
    """(train, val, base model, the shared training config) for this invocation."""
    return *load_inputs(args), kp.TrainConfig(epochs=args.epochs, optimizer=kp.SGD(lr=0.01), seed=args.seed)


def run_only(args: argparse.Namespace) -> None:
    """Run (or resume) the named runs only; a later full invocation reuses them for the table."""
    train, val, base, ft = setup(args)
    chosen = {tag: recipe for _, _, tag, recipe in recipes(ft, args.ramp_epochs) if tag in args.only}
    if unknown := set(args.only) - set(chosen):
        raise SystemExit(f"unknown run tags {sorted(unknown)}; known: {[t for _, _, t, _ in recipes(ft, 0)]}")
    for tag in args.only:
        run_recipe(chosen[tag], base, train, val, args.runs / f"{tag}-s{args.seed}")


def main() -> None:
    """Run every recipe (resuming), the control, interleaved latency; write table and plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="total training epochs of every method")
    p.add_argument("--ramp-epochs", type=float, default=2.0, help="SDAP's cubic ramp (within --epochs)")
    add_run_args(p, "sdap_fmnist")
    p.add_argument("--only", nargs="+", metavar="TAG",
                   help="run only these runs (e.g. sdap-p0.25) and write no table: to split the work over processes")
    args = p.parse_args()
    if args.only:
        return run_only(args)
    train, val, base, ft = setup(args)
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, val, x)
    rows = [{"method": "dense base", "key": "dense base", "target": "-", **base_m, "epochs": 0},
            {"method": "dense + same epochs (control)", "target": "-", **base_m, "epochs": args.epochs,
             "top1": dense_control(base, train, val, ft, args.runs / "dense-control")}]
    models, at25 = {"dense base": base}, {}
    for name, label, tag, recipe in recipes(ft, args.ramp_epochs):
        rep, model = run_recipe(recipe, base, train, val, args.runs / f"{tag}-s{args.seed}")
        if model is None:
            rows.append({"method": name, "target": label, "note": rep["error"][:120]})
            continue
        key = f"{name} @{label}"
        models[key] = model
        rows.append({"method": name, "key": key, "target": label, **rep["after"], "epochs": args.epochs,
                     "delta": rep["after"]["top1"] - base_m["top1"], "wall_s": rep["wall_time_s"]})
        if label == "params 0.25" and name in ("SDAP", "L1Finetune", "SDAP, uniform rates"):  # KD = L1's plan
            at25[name] = rep
    add_latency(rows, models, base_m, tuple(x.shape[1:]))
    plot_widths(at25, RESULTS / f"{args.name.replace('sdap_', 'sdap_widths_')}.png")
    cols = {"method": "method", "target": "target kept", "top1": "top-1 %", "delta": "vs base",
            "params": "params", "params_kept": "params kept", "flops_kept": "FLOPs kept",
            "lat_bs64_ms": "CPU ms bs64", "speedup_bs64": "speed-up bs64", "speedup_bs1": "speed-up bs1",
            "epochs": "epochs", "wall_s": "wall s", "note": "note"}
    extra = {"seeds": 1, "base": str(args.base),
             "training": f"{args.epochs} epochs SGD lr 0.01 cosine for every method; SDAP ramp "
                         f"{args.ramp_epochs} epochs, T=4, alpha=0.9 unless stated",
             "latency": LATENCY_NOTE}
    print(open(write_results(args.name, rows, cols, extra)).read())


if __name__ == "__main__":
    main()
