"""How many training batches the BatchNorm re-estimation needs (issue 35): prune-only top-1 of
the option-B base on the validation split it never saw, L1-pruned to 50% of FLOPs and 25% of
params, re-estimated on N batches of 128 for N in 0..100, 3 batch orders (seeds); then the issue's
goal on the shipped option-A base (L1 to 50% of FLOPs, test set: that base trained on all 60,000
training images, so no split of them is clean), with the default N. Public API only.

    python benchmarks/recal_batches.py          # ~5 min on 2 cores -> results/recal_batches.{json,md}
"""
from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import kdprune as kp
from kdprune.engine import Recalibrate, Target, prune_to_target, recalibrate_norms
from kdprune.methods.base import RECAL_BATCHES
from kdprune.training import evaluate
from kdprune.utils.meta import run_metadata

OUT = Path(__file__).with_name("results")
BATCHES = (0, 1, 2, 5, 10, 30, 100)
TARGETS = (Target(flops=0.5), Target(params=0.25))
SEEDS = (0, 1, 2)


def sweep(base: nn.Module, train, scored, name: str, batches: tuple[int, ...], targets) -> list[dict]:
    """Prune-only top-1 on ``scored`` for every target x batch count x seed."""
    rows, x = [], torch.zeros(1, 1, 28, 28)
    for target in targets:
        pruned = copy.deepcopy(base)
        prune_to_target(pruned, x, target)
        for n in batches:
            for seed in SEEDS if n else (0,):
                m, start = copy.deepcopy(pruned), time.perf_counter()
                recalibrate_norms(m, train, Recalibrate(batches=n, seed=seed), before=base)
                seconds = time.perf_counter() - start  # a column only: the cores may be shared
                rows.append({"base": name, "target": f"{target.metric}{target.value:g}", "batches": n, "seed": seed,
                             "top1": evaluate(m, scored)["top1"], "seconds": seconds})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    splits = kp.data.load_splits("fashion-mnist", val=5000)
    rows = sweep(kp.pretrained("resnet20b-fmnist"), splits.train, splits.val, "resnet20b-fmnist (val)", BATCHES,
                 TARGETS)
    train, test = kp.data.load("fashion-mnist")
    rows += sweep(kp.pretrained("resnet20-fmnist"), train, test, "resnet20-fmnist (test)", (0, RECAL_BATCHES),
                  TARGETS[:1])
    OUT.mkdir(exist_ok=True)
    (OUT / "recal_batches.json").write_text(json.dumps({"rows": rows, "meta": run_metadata()}, indent=1) + "\n")
    (OUT / "recal_batches.md").write_text(_table(rows) + "\n")


def _table(rows: list[dict]) -> str:
    lines = ["| base (scored on) | target | batches (x128 images) | top-1 % (mean ± std, 3 seeds) | seconds |",
             "|---|---|---:|---:|---:|"]
    for key in dict.fromkeys((r["base"], r["target"], r["batches"]) for r in rows):
        sel = [r for r in rows if (r["base"], r["target"], r["batches"]) == key]
        v, s = [r["top1"] for r in sel], [r["seconds"] for r in sel]
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {statistics.mean(v):.2f} ± {std:.2f} | "
                     f"{statistics.median(s):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
