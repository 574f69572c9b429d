"""kdprune's engine vs torch-pruning's own MagnitudePruner on the construct test architectures.

    python benchmarks/tp_constructs.py

For each architecture of tests/engine/constructs.py and constructs_split.py (plus our option-A ResNet-20) and each target
(50% of FLOPs, 25% of params kept), each tool prunes to the target: kdprune with
``prune_to_target`` (L1, uniform), torch-pruning 1.6 with ``MagnitudePruner`` (L1, local), its
``pruning_ratio`` bisected to the target (its own API has no FLOPs target). Each run is a separate
process with a 120 s and 3 GB limit, because torch-pruning may trace for minutes with memory
growing on a channel shuffle. Reported: the fraction reached (FLOPs or params kept), convs whose
width changed, and whether the pruned model still runs a forward, or the error. (kdprune's
pruned == masked check on the same nets is tests/engine/test_constructs.py.)
Writes benchmarks/results/tp_constructs.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import json
import subprocess
import sys
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("resnext", "regnet", "shufflev1", "shufflev2", "dualpath", "separable", "resnet20a",
         # issue 31 (tests/engine/constructs_split.py)
         "csp", "res2net", "mixconv", "ghost", "sk", "ws", "eca", "partialres", "composite")
TARGETS = (("flops", 0.5), ("params", 0.25))

_CHILD = r'''
import copy, json, resource, sys, warnings
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import torch
from torch import nn
from tests.engine.test_constructs import FACTORIES, X
torch.set_num_threads(1)
tool, name, metric, goal = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
torch.manual_seed(0)
dense = FACTORIES[name]().eval()

def widths(m):
    return {n: c.out_channels for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}

def kept(m):
    import torch_pruning as tp
    macs, params = tp.utils.count_ops_and_params(m, X)
    d_macs, d_params = tp.utils.count_ops_and_params(dense, X)
    return (macs / d_macs) if metric == "flops" else (params / d_params)

def run_tp(ratio):
    import torch_pruning as tp
    m = copy.deepcopy(dense)
    fc = [c for c in m.modules() if isinstance(c, nn.Linear)]
    pr = tp.pruner.MagnitudePruner(m, X, importance=tp.importance.MagnitudeImportance(p=1),
                                   pruning_ratio=ratio, ignored_layers=fc)
    pr.step()
    m(X)  # a pruned model that does not run is a failure
    return m

def tp_search():
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = run_tp(mid)
        k = kept(m)
        if best is None or abs(k - goal) < abs(best[0] - goal):
            best = (k, m)
        if abs(k - goal) <= 0.01:
            break
        lo, hi = (mid, hi) if k > goal else (lo, mid)
    return best

out = {}
try:
    if tool == "kdprune":
        from kdprune.engine import Target, prune_to_target
        m = copy.deepcopy(dense)
        rep = prune_to_target(m, X, Target(**{metric: goal}))
        k = rep.achieved
    else:
        k, m = tp_search()
    w0, w1 = widths(dense), widths(m)
    out = {"kept": round(k, 4), "within_1pct": abs(k - goal) <= 0.01,
           "narrowed": f"{sum(w0[n] != w1.get(n, w0[n]) for n in w0)}/{len(w0)}", "runs": True}
except BaseException as e:  # MemoryError, RecursionError...: the row says what happened
    out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
print("RESULT " + json.dumps(out))
'''


def run_one(tool: str, name: str, metric: str, goal: float) -> dict:
    """One tool on one construct and target, in its own limited process."""
    try:
        p = subprocess.run([sys.executable, "-c", _CHILD, tool, name, metric, str(goal)], capture_output=True,
                           text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"error": "still tracing/pruning after 120 s (killed)"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"process died (rc {p.returncode}): {tail[:160]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    """Every construct x target x tool; write the table."""
    rows = []
    for name in NAMES:
        for metric, goal in TARGETS:
            for tool in ("kdprune", "torch-pruning"):
                r = run_one(tool, name, metric, goal)
                rows.append({"arch": name, "target": f"{metric} {goal}", "tool": tool,
                             **{k: r.get(k, "") for k in ("kept", "within_1pct", "narrowed")},
                             "error": r.get("error", "")})
                print(rows[-1], flush=True)
    cols = {"arch": "architecture", "target": "target (kept)", "tool": "tool", "kept": "reached",
            "within_1pct": "within 1%", "narrowed": "convs narrowed", "error": "error"}
    write_results("tp_constructs", rows, cols, {"torch-pruning": "MagnitudePruner(L1, local), ratio bisected"})


if __name__ == "__main__":
    main()
