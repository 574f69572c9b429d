"""Train zoo models on Fashion-MNIST and report test accuracy, params, FLOPs and CPU latency.

    python benchmarks/zoo_fmnist.py --models resnet20:15 resnet56:2

Each model trains into runs/base-<model> (resumed if a checkpoint is there, so a killed run
continues); the table goes to benchmarks/results/zoo_fmnist.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
from pathlib import Path

import kdprune as kp
from common import write_results


def run_one(name: str, epochs: int, runs: Path, seed: int) -> dict:
    """Train (or resume) one model and measure it."""
    train, val = kp.data.load("fashion-mnist")
    out = runs / f"base-{name}"
    model = kp.create_model(name, num_classes=train.num_classes, in_chans=train.in_chans)
    cfg = kp.TrainConfig(epochs=epochs, seed=seed)
    res = kp.train(model, train, val, cfg, out_dir=out, resume=(out / "checkpoint.pt").is_file())
    c = kp.complexity(res.model, input_size=(1, 1, 28, 28))
    lat = kp.metrics.measure_latency(res.model, (1, 28, 28), batch_sizes=(1, 64), threads=2, repeats=30)
    m = kp.evaluate(res.model, val)
    train_time = sum(r["epoch_time_s"] for r in res.history)
    return {"model": name, "epochs": epochs, "seed": seed, "top1": m["top1"], "top5": m["top5"],
            "params": c.params, "macs": c.macs, "flops": c.flops,
            "lat_bs1_ms": lat[1]["median_ms"], "lat_bs64_ms": lat[64]["median_ms"],
            "train_s_per_epoch": train_time / max(len(res.history), 1)}


def main() -> None:
    """Parse `name:epochs` pairs, train and measure each, write the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20:15", "resnet56:2"], help="name:epochs pairs")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where the training runs go")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cols = {"model": "model", "epochs": "epochs", "top1": "test top-1 %", "params": "params", "macs": "MACs",
            "flops": "FLOPs", "lat_bs1_ms": "CPU ms (bs 1)", "lat_bs64_ms": "CPU ms (bs 64)",
            "train_s_per_epoch": "train s/epoch"}
    extra = {"seeds": 1, "data": "fashion-mnist 60k/10k", "latency": "median of 30, 2 threads"}
    rows = []
    for m in args.models:  # the table is rewritten after each model, so a long run keeps what it has
        rows.append(run_one(m.split(":")[0], int(m.split(":")[1]), args.runs, args.seed))
        path = write_results("zoo_fmnist", rows, cols, extra)
    print(open(path).read())


if __name__ == "__main__":
    main()
