"""What a channel width costs on this CPU: ResNet-20 (the shipped option-B base) pruned to uniform
widths, forward + backward at one batch in training mode, timed interleaved over rounds, one
thread. Widths one above a multiple of 8 cost like much wider ones (the SIMD kernels pad them),
which is what SDAP's last gated epoch pays: after the second cut it trains 9/17/33 channels per
stage, one above the final 8/16/32 (docs/methods/sdap.md).

    python benchmarks/width_cost.py --rounds 5

Per width: the median milliseconds per step over rounds and the ratio to the 8/16/32 network.
Results: benchmarks/results/width_cost.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import kdprune as kp
from common import write_results
from kdprune.engine import PruningPlan, apply_plan, channel_groups


def at_width(base: torch.nn.Module, first: int, x: torch.Tensor) -> torch.nn.Module:
    """``base`` with ``first`` channels in its first stage and 2x / 4x that in the next two
    (the highest-index channels removed: which ones does not change the cost)."""
    model = copy.deepcopy(base)
    groups = channel_groups(copy.deepcopy(model), x)
    full = max(g.channels for g in groups) // 4  # 16 for ResNet-20
    plan = PruningPlan({g.root: list(range(g.channels * first // full, g.channels))
                        for g in groups if g.channels * first // full < g.channels})
    apply_plan(model, x, plan)
    return model


def step_ms(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, steps: int) -> float:
    """Milliseconds per forward + backward (training mode, cross-entropy)."""
    model.train()
    t = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="resnet20b-fmnist", help="shipped base (kp.pretrained name)")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 9, 12, 16], help="first-stage widths")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="steps per timing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, x = kp.pretrained(args.base), torch.randn(1, 1, 28, 28)
    models = {w: at_width(base, w, x) for w in args.widths}
    xb, yb = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    for m in models.values():
        step_ms(m, xb, yb, 1)  # warm-up: kernels for these shapes
    seen: dict[int, list[float]] = {w: [] for w in models}
    for _ in range(args.rounds):
        for w, m in models.items():
            seen[w].append(step_ms(m, xb, yb, args.steps))
    ref = statistics.median(seen[min(args.widths)])
    rows = [{"widths": f"{w}/{2 * w}/{4 * w}", "params": sum(q.numel() for q in models[w].parameters()),
             "ms": round(statistics.median(v), 1), "vs": round(statistics.median(v) / ref, 2),
             "rounds_ms": " / ".join(f"{t:.0f}" for t in v)} for w, v in seen.items()]
    cols = {"widths": "channels per stage", "params": "params", "ms": "ms per step (median)",
            "vs": f"x {min(args.widths)}/{2 * min(args.widths)}/{4 * min(args.widths)}", "rounds_ms": "per round ms"}
    print(write_results("width_cost", rows, cols, {"batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                                                   "threads": args.threads}).read_text())


if __name__ == "__main__":
    main()
