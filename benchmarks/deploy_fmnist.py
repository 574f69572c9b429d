"""Measured speed-up per backend vs the FLOPs ratio, and latency- vs FLOPs-targeted pruning.

    python benchmarks/deploy_fmnist.py --train        # SDAP at 50%/25% FLOPs, L1 at target_latency 0.5
    python benchmarks/deploy_fmnist.py --report       # quiet machine: every backend, batch 1 and 64

From the shipped base ``pretrained:resnet20-fmnist`` on the cascade grid's 20k training images and
schedule (3 epochs, SGD 0.01 cosine, seed 1): L1Finetune at 50% / 25% of FLOPs are the cascade
grid's runs (``--cascade-runs``); SDAP and the latency-targeted L1Finetune are trained here. The
report times every model on every available backend, interleaved (medians), and divides each
speed-up by the FLOPs ratio (dense FLOPs / model FLOPs): 1.0 means the FLOPs saving shows fully.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
from pathlib import Path

import torch

import kdprune as kp
from common import RESULTS, append_jsonl, provenance, read_jsonl, run_recipe, subset_inputs, write_results

BASE = "pretrained:resnet20-fmnist"
JSONL = RESULTS / "deploy_fmnist_runs.jsonl"
MACHINE = "2-core CPU, 1 thread per run"


def _cfg(args: argparse.Namespace) -> kp.TrainConfig:
    return kp.TrainConfig(epochs=3, optimizer=kp.SGD(lr=0.01), seed=args.seed, threads=args.threads)


def recipes(args: argparse.Namespace) -> dict[str, object]:
    """Run tag -> recipe trained by this script."""
    s, r, ft = args.seed, kp.recipes, _cfg(args)
    out = {f"sdap-f{t}-s{s}": r.SDAP(target_flops=t, finetune=ft, ramp_epochs=1.0) for t in (0.5, 0.25)}
    out[f"l1finetune-lat0.5-bs{args.latency_batch}-s{s}"] = r.L1Finetune(
        target_latency=0.5, latency_batch=args.latency_batch, finetune=ft)
    return out


def train(args: argparse.Namespace, base, data, test) -> None:
    """Train what is not committed yet; one JSONL line per finished run."""
    for tag, recipe in recipes(args).items():
        if any(r["run"] == tag for r in read_jsonl(JSONL)):
            continue
        rep, _ = run_recipe(recipe, base, data, test, args.runs / tag)
        if "after" not in rep:
            print("failed:", tag, rep, flush=True)
            continue
        lat = rep["method"].get("latency_target") or {}
        append_jsonl(JSONL, {"run": tag, "recipe": rep["recipe"]["type"], "seed": args.seed,
                             "top1": rep["after"]["top1"], "wall_s": rep["wall_time_s"],
                             "flops_kept": round(rep["after"]["flops"] / rep["before"]["flops"], 4),
                             "latency_target": lat, **provenance(MACHINE)})


def _models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    s = args.seed
    dirs = {"L1Finetune 50% FLOPs": args.cascade_runs / f"l1finetune-f0.5-s{s}",
            "L1Finetune 25% FLOPs": args.cascade_runs / f"l1finetune-f0.25-s{s}",
            "SDAP 50% FLOPs": args.runs / f"sdap-f0.5-s{s}", "SDAP 25% FLOPs": args.runs / f"sdap-f0.25-s{s}",
            f"L1Finetune latency 0.5 (bs{args.latency_batch})":
                args.runs / f"l1finetune-lat0.5-bs{args.latency_batch}-s{s}"}
    return {k: kp.load_pruned(d / "model") for k, d in dirs.items() if (d / "model").is_dir()}


def report(args: argparse.Namespace, base, data, test) -> None:
    """Every model x backend at batch 1 and 64, speed-up and its fraction of the FLOPs ratio."""
    x = kp.methods.infer_example_input(data)
    models = {"dense base": base, **_models(args)}
    flops = {k: kp.metrics.complexity(m, example_input=x).flops for k, m in models.items()}
    backends = kp.metrics.available_backends()
    lat = kp.metrics.compare_backends(models, tuple(x.shape[1:]), backends, (1, 64), threads=args.threads,
                                      rounds=args.rounds)
    rows = []
    for name, m in models.items():
        top1 = kp.evaluate(m, test)["top1"]
        for b in backends:
            row = {"model": name, "backend": b.value, "top1": top1,
                   "flops_ratio": round(flops["dense base"] / flops[name], 3)}
            for bs in (1, 64):
                st = lat[name][b.value][bs]
                row[f"ms_bs{bs}"] = round(st["median_ms"], 3)
                row[f"speedup_bs{bs}"] = round(st["speedup"], 3)
                row[f"of_flops_bs{bs}"] = round(st["speedup"] / row["flops_ratio"], 3)
            rows.append(row)
    cols = {"model": "model", "backend": "backend", "top1": "test top-1 %", "flops_ratio": "FLOPs ratio",
            "ms_bs1": "ms bs1", "speedup_bs1": "speed-up bs1", "of_flops_bs1": "of FLOPs ratio bs1",
            "ms_bs64": "ms bs64", "speedup_bs64": "speed-up bs64", "of_flops_bs64": "of FLOPs ratio bs64"}
    extra = {"base": BASE, "latency": f"median of {args.rounds} interleaved rounds, {args.threads} thread(s)",
             "raw lines": "benchmarks/results/deploy_fmnist_runs.jsonl", "seed": args.seed}
    print(open(write_results("deploy_fmnist", rows, cols, extra)).read())


def main() -> None:
    """Train the runs, or write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--runs", type=Path, default=Path("runs/deploy_fmnist"))
    p.add_argument("--cascade-runs", type=Path, default=Path("runs/cascade_fmnist"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data, test, base = subset_inputs(args.train_images, args.seed, BASE)
    if args.train:
        train(args, base, data, test)
    if args.report:
        report(args, base, data, test)


if __name__ == "__main__":
    main()
