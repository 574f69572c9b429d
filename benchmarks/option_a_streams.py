"""Option-A ResNet-20: residual streams pruned (index-placing shortcut) vs the inner-conv-only plan.

    python benchmarks/option_a_streams.py --plans streams --threads 1 &    # one core each
    python benchmarks/option_a_streams.py --plans inner --threads 1 &       # seeds 0 1 2
    wait; python benchmarks/option_a_streams.py --report                   # when the machine is quiet

Both plans start from the shipped base ``pretrained:resnet20-fmnist`` (option A), keep 50% of
FLOPs with L1 importance and uniform allocation, and get the same fine-tune (SGD 0.01, cosine).
"dense-control" is the base fine-tuned the same way, unpruned. "inner" ignores the three stream
roots (conv1, layer2.0.conv2, layer3.0.conv2), which is what the engine did before the pad
shortcut became index-placing; "streams" prunes every group. The test set is only reported: no
choice is made on it. Runs resume when killed; the report measures
interleaved CPU latency at batch 1 and 64 and writes benchmarks/results/option_a_streams.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import copy
import json
from pathlib import Path

import torch

import kdprune as kp
from common import add_latency, write_results

BASE = "pretrained:resnet20-fmnist"
STREAM_ROOTS = ("conv1", "layer2.0.conv2", "layer3.0.conv2")
PLANS = {"streams": (), "inner": STREAM_ROOTS, "dense-control": None}  # None: no pruning (the control)


def run_plan(name: str, base, train, val, ft: kp.TrainConfig, runs: Path, target: float) -> dict:
    """Prune one plan to the FLOPs target, fine-tune (resumable), save; returns its row."""
    out = runs / f"{name}-f{target}-s{ft.seed}"
    if (out / "row.json").is_file():
        return json.loads((out / "row.json").read_text())
    model = copy.deepcopy(base)
    x = kp.methods.infer_example_input(train)
    achieved = 1.0
    if PLANS[name] is not None:
        rep = kp.engine.prune_to_target(model, x, kp.engine.Target(flops=target), ignored_layers=PLANS[name])
        achieved = rep.achieved
    res = kp.train(model, train, val, ft, out_dir=out / "finetune", resume=(out / "finetune").is_dir())
    kp.save_pruned(res.model, out / "model")
    row = {"plan": name, "key": name, "seed": ft.seed, "target_flops": target, "achieved": achieved,
           "ignored": list(PLANS[name] or ()), **kp.methods.measure(res.model, val, x),
           "epochs": ft.epochs, "wall_s": sum(h.get("epoch_time_s", 0.0) for h in res.history)}
    (out / "row.json").write_text(json.dumps(row))
    return row


def main() -> None:
    """Run the asked plans, or (--report) gather rows, measure latency and write the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", nargs="*", choices=sorted(PLANS), default=sorted(PLANS),
                   help="dense-control: the base fine-tuned the same epochs, unpruned")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs/option_a_streams"))
    p.add_argument("--report", action="store_true", help="gather every finished run and measure latency")
    args = p.parse_args()
    train, val = kp.data.load("fashion-mnist")
    base = kp.pretrained(BASE)
    if not args.report:
        for n in args.plans:
            for s in args.seeds:
                run_plan(n, base, train, val, _ft(args, s), args.runs, args.target)
        return
    runs = {n: [json.loads(f.read_text()) for f in sorted(args.runs.glob(f"{n}-f{args.target}-s*/row.json"))]
            for n in PLANS}
    runs = {n: v for n, v in runs.items() if v}
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, val, x)
    rows = [{"plan": "dense base", "key": "dense base", **base_m}] + [_mean_row(r) for r in runs.values()]
    # pruning is deterministic (L1 on the same base): every seed has the same architecture
    models = {"dense base": base, **{n: kp.load_pruned(args.runs / f"{n}-f{args.target}-s{v[0]['seed']}" / "model")
                                     for n, v in runs.items()}}
    add_latency(rows, models, base_m, tuple(x.shape[1:]))
    cols = {"plan": "plan", "top1": "test top-1 (mean)", "top1_std": "std", "seeds": "seeds",
            "flops_kept": "FLOPs kept", "params_kept": "params kept",
            "lat_bs1_ms": "bs1 ms", "speedup_bs1": "bs1 x", "lat_bs64_ms": "bs64 ms", "speedup_bs64": "bs64 x",
            "wall_s": "fine-tune s"}
    per_seed = {n: [r["top1"] for r in v] for n, v in runs.items()}
    write_results("option_a_streams", rows, cols,
                  {"base": BASE, "fine-tune": f"{args.epochs} epochs SGD 0.01 cosine", "per_seed_top1": per_seed})


def _ft(args: argparse.Namespace, seed: int) -> kp.TrainConfig:
    return kp.TrainConfig(epochs=args.epochs, optimizer=kp.SGD(lr=0.01), seed=seed, threads=args.threads)


def _mean_row(rows: list[dict]) -> dict:
    """One plan over its seeds: mean and std of test top-1 and fine-tune wall time."""
    acc = torch.tensor([r["top1"] for r in rows], dtype=torch.float64)
    wall = [r["wall_s"] for r in rows]
    return {**rows[0], "top1": float(acc.mean()), "top1_std": float(acc.std()) if len(rows) > 1 else 0.0,
            "seeds": len(rows), "wall_s": sum(wall) / len(wall)}


if __name__ == "__main__":
    main()
