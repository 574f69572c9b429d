"""How many training batches the BatchNorm re-estimation needs (issue 35): prune-only top-1 on the
validation split of the option-B base, L1-pruned to 50% of FLOPs and 25% of params, re-estimated
on N batches of 128 for N in 1..100, 3 batch orders (seeds). Public API only.

    python benchmarks/recal_batches.py          # ~3 min on 2 cores -> results/recal_batches.{json,md}
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

import kdprune as kp
from kdprune.engine import Recalibrate, Target, prune_to_target, recalibrate_norms
from kdprune.training import evaluate
from kdprune.utils.meta import run_metadata

OUT = Path(__file__).with_name("results")
BATCHES = (0, 1, 2, 5, 10, 30, 100)
TARGETS = (Target(flops=0.5), Target(params=0.25))
SEEDS = (0, 1, 2)


def main() -> None:
    splits = kp.data.load_splits("fashion-mnist", val=5000)
    base = kp.pretrained("resnet20b-fmnist")
    x, rows = torch.zeros(1, 1, 28, 28), []
    for target in TARGETS:
        pruned = copy.deepcopy(base)
        prune_to_target(pruned, x, target)
        for n in BATCHES:
            for seed in SEEDS if n else (0,):
                m, start = copy.deepcopy(pruned), time.perf_counter()
                recalibrate_norms(m, splits.train, Recalibrate(batches=n, seed=seed), before=base)
                seconds = time.perf_counter() - start  # a column only: the cores may be shared
                rows.append({"target": f"{target.metric}{target.value:g}", "batches": n, "seed": seed,
                             "val_top1": evaluate(m, splits.val)["top1"], "seconds": seconds})
                print(rows[-1], flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "recal_batches.json").write_text(json.dumps({"rows": rows, "meta": run_metadata()}, indent=1) + "\n")
    (OUT / "recal_batches.md").write_text(_table(rows) + "\n")


def _table(rows: list[dict]) -> str:
    lines = ["| target | batches (x128 images) | val top-1 % (mean ± std, 3 seeds) | seconds |",
             "|---|---:|---:|---:|"]
    for t in dict.fromkeys(r["target"] for r in rows):
        for n in BATCHES:
            v = [r["val_top1"] for r in rows if r["target"] == t and r["batches"] == n]
            s = [r["seconds"] for r in rows if r["target"] == t and r["batches"] == n]
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            lines.append(f"| {t} | {n} | {statistics.mean(v):.2f} ± {std:.2f} | {statistics.median(s):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
