"""EDP with and without KD vs L1Finetune and KDFinetune on Fashion-MNIST at 50% and 25% of FLOPs.

    python benchmarks/edp_fmnist.py --only sweep                 # lam on a held-out split (25%, no KD)
    python benchmarks/edp_fmnist.py --only main --targets 0.5 &  # EDP +- KD at the chosen lam
    python benchmarks/edp_fmnist.py --only main --targets 0.25 &
    wait; python benchmarks/edp_fmnist.py --only walltime        # L1/KD with EDP's wall time
    python benchmarks/edp_fmnist.py --report                     # when quiet: latency, memory, table

Same base, data and schedule as benchmarks/cascade_fmnist.py (``pretrained:resnet20-fmnist``, 20k
stratified training images, SGD 0.01 cosine per stage): EDP trains ``--sparse-epochs`` with the
group prox, then fine-tunes ``--finetune-epochs``; the equal-epoch baselines are the cascade grid's
L1Finetune/KDFinetune runs with the same total epochs (read from its committed JSONL). lam is
chosen on 5,000 of the training images held out (EDP trained on the other 15,000), never the test
set. Each finished run appends one line to benchmarks/results/edp_fmnist_runs.jsonl at once.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import torch

import kdprune as kp
from common import (LATENCY_NOTE, RESULTS, add_latency, append_jsonl, group_lines, load_row_models, mean_std,
                    provenance, read_jsonl, run_recipe, subset_inputs, write_results)

BASE = "pretrained:resnet20-fmnist"
JSONL = RESULTS / "edp_fmnist_runs.jsonl"
CASCADE = RESULTS / "cascade_fmnist_runs.jsonl"  # the equal-epoch baselines and the dense control
MACHINE = "2-core CPU, 1 thread per run, two runs at once"


def _cfg(args: argparse.Namespace, epochs: int) -> kp.TrainConfig:
    return kp.TrainConfig(epochs=epochs, optimizer=kp.SGD(lr=0.01), seed=args.seed, threads=args.threads)


def _edp(args: argparse.Namespace, t: float, lam: float, kd: float) -> kp.recipes.EDP:
    return kp.recipes.EDP(target_flops=t, lam_col=lam, lam_row=lam, kd_alpha=kd,
                          sparse=_cfg(args, args.sparse_epochs), finetune=_cfg(args, args.finetune_epochs))


def _line(tag: str) -> dict | None:
    return next((r for r in read_jsonl(JSONL) + read_jsonl(CASCADE) if r["run"] == tag), None)


def best_lam(args: argparse.Namespace) -> float:
    """The swept lam with the best held-out top-1 (EDP trained on the rest of the training images)."""
    sweep = [r for r in read_jsonl(JSONL) if r["run"].startswith("sweep-") and r["seed"] == args.seed]
    if not sweep:
        raise SystemExit("run --only sweep first")
    return max(sweep, key=lambda r: (r["held_top1"], -r["lam"]))["lam"]


def grid(args: argparse.Namespace, part: str) -> dict[str, tuple[object, float]]:
    """Run tag -> (recipe, target) for one part."""
    s, r = args.seed, kp.recipes
    if part == "sweep":
        return {f"sweep-lam{lam}-f0.25-s{s}": (_edp(args, 0.25, lam, 0.0), 0.25) for lam in args.lams}
    if part == "main":
        lam = best_lam(args)
        return {f"edp-{'kd' if kd else 'ce'}-lam{lam}-f{t}-s{s}": (_edp(args, t, lam, kd), t)
                for t in args.targets for kd in (0.0, args.kd_alpha)}
    if part == "ablation":  # at 25%, no KD: the epoch split, and uniform allocation
        lam, total, t = best_lam(args), args.sparse_epochs + args.finetune_epochs, 0.25
        late = dataclasses.replace(_edp(args, t, lam, 0.0), sparse=_cfg(args, 1), finetune=_cfg(args, total - 1))
        flat = dataclasses.replace(_edp(args, t, lam, 0.0), mode=kp.engine.Uniform())
        return {f"edp-ce-lam{lam}-split1+{total - 1}-f{t}-s{s}": (late, t),
                f"edp-ce-lam{lam}-uniform-f{t}-s{s}": (flat, t)}
    out, total = {}, args.sparse_epochs + args.finetune_epochs
    for t in args.targets:
        budget = _line(f"edp-ce-lam{best_lam(args)}-f{t}-s{s}")["wall_s"]
        for name, cls in (("l1finetune", r.L1Finetune), ("kdfinetune", r.KDFinetune)):
            ep = max(total, math.floor(budget / (_line(f"{name}-f{t}-s{s}")["wall_s"] / total)))
            out[f"{name}-wall{ep}ep-f{t}-s{s}"] = (cls(target_flops=t, finetune=_cfg(args, ep)), t)
    return out


def _record(args: argparse.Namespace, tag: str, rep: dict, top1: float, held_top1: float | None) -> None:
    r, m = rep["recipe"], rep["method"]
    line = {"run": tag, "recipe": r["type"], "seed": args.seed, "target_flops": r["target_flops"],
            "epochs": r["finetune"]["epochs"] + (r["sparse"]["epochs"] if "sparse" in r else 0), "top1": top1,
            "flops_kept": round(rep["after"]["flops"] / rep["before"]["flops"], 4),
            "params_kept": round(rep["after"]["params"] / rep["before"]["params"], 4), "wall_s": rep["wall_time_s"]}
    if r["type"] == "EDP":
        line.update(lam=r["lam_col"], kd_alpha=r["kd_alpha"], merged=m["merged"], layers=m["layers"],
                    split=f"{r['sparse']['epochs']}+{r['finetune']['epochs']}", mode=str(r["mode"]))
    if held_top1 is not None:
        line["held_top1"] = held_top1
    append_jsonl(JSONL, {**line, "base_top1": rep["before"]["top1"], **provenance(MACHINE)})


def run_part(args: argparse.Namespace, part: str, base, train, test) -> None:
    """Every run of one part (resumable, skipped when its line is committed)."""
    rest, held = train.split(5000, seed=args.seed)
    for tag, (recipe, _) in grid(args, part).items():
        if _line(tag) is not None:
            continue
        sweep = part == "sweep"
        rep, model = run_recipe(recipe, base, rest if sweep else train, held if sweep else test, args.runs / tag)
        if "after" not in rep:
            print("failed:", tag, rep, flush=True)
            continue
        if sweep:  # "after" was scored on the held-out split; the test set is only reported
            _record(args, tag, rep, kp.evaluate(model, test)["top1"], rep["after"]["top1"])
        else:
            _record(args, tag, rep, rep["after"]["top1"], None)
        print(tag, rep["after"]["top1"], flush=True)


MEMORY_CODE = """
import sys, torch, kdprune as kp
torch.set_num_threads(1)
m = kp.load_pruned(sys.argv[1]).eval()
x = torch.randn(64, *[int(v) for v in sys.argv[2:]])
def kib(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))
with torch.no_grad():
    m(x)  # allocator warm: the peak below is the forward's working set, not first-touch
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
    before = kib('VmRSS:')
    for _ in range(3):
        m(x)
print((kib('VmHWM:') - before) / 1024)
"""


def peak_inference_mib(model_dir: Path, shape: tuple[int, ...]) -> float:
    """Peak RSS above the resting RSS (MiB) during batch-64 forwards, in a fresh process (one thread;
    Linux: the peak is reset through /proc/self/clear_refs after a warm-up forward)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CODE, str(model_dir), *map(str, shape)], check=True,
                         capture_output=True, text=True, timeout=300)
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def _label(r: dict) -> str:
    if r["recipe"] == "EDP":
        extra = "".join(f", {v}" for v in (r.get("split"), r.get("mode")) if v and v not in ("2+1", "global"))
        return f"EDP{' + KD' if r['kd_alpha'] else ''} (lam {r['lam']}{extra})"
    if r["recipe"] == "dense control":
        return f"dense + {r['epochs']} epochs (control)"
    wall = " equal wall" if "wall" in r["run"] else ""
    return f"{r['recipe']} ({r.get('epochs', 3)} ep{wall})"


def _rows(args: argparse.Namespace) -> list[dict]:
    """One row per run kind and target over seeds (sweep runs left out: they trained on less data)."""
    keep = [r for r in read_jsonl(JSONL) if not r["run"].startswith("sweep-")]
    keep += [r for r in read_jsonl(CASCADE) if r["recipe"] in ("L1Finetune", "KDFinetune", "dense control")
             and r.get("phase", "equal epochs") == "equal epochs"]
    groups, rows = group_lines(keep, lambda r: (_label(r), r.get("target_flops", 1.0))), []
    for (label, t), rs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        row = {"method": label, "target": t, "top1": mean_std([r["top1"] for r in rs]), "seeds": len(rs),
               "wall_s": round(sum(r["wall_s"] for r in rs) / len(rs)), "runs": [r["run"] for r in rs]}
        if "layers" in rs[0]:
            row["ranks"] = " ".join(str(w["rank"]) for w in rs[0]["layers"].values() if w["rank"] is not None) or "-"
            row["merged"] = rs[0]["merged"]
        rows.append(row)
    return rows


def report(args: argparse.Namespace, base, train, test) -> None:
    """The table: accuracy over seeds, sizes, ranks, interleaved latency, peak inference memory."""
    x = kp.methods.infer_example_input(train)
    base_m = kp.methods.measure(base, test, x)
    rows = [{"method": "dense base", "key": "dense base", "target": 1.0, **base_m, "top1": f"{base_m['top1']:.2f}"}]
    rows += _rows(args)
    shape = tuple(x.shape[1:])
    models = {"dense base": base, **load_row_models(rows, [args.runs, args.cascade_runs], x)}
    for row in (r for r in rows if r.get("key") in models and r["key"] != "dense base"):
        folder = next(f for f in (args.runs, args.cascade_runs) if (f / row["key"] / "model").is_dir())
        row["peak_mib"] = peak_inference_mib(folder / row["key"] / "model", shape)
    add_latency(rows, models, base_m, shape)
    cols = {"method": "method", "target": "FLOPs target", "top1": "test top-1 % (mean ± std, seeds)",
            "flops_kept": "FLOPs kept", "params_kept": "params kept", "ranks": "ranks kept (unmerged layers)",
            "merged": "merged", "peak_mib": "peak RSS +MiB bs64", "wall_s": "wall s",
            "speedup_bs1": "speed-up bs1", "speedup_bs64": "speed-up bs64"}
    extra = {"base": BASE, "train images": args.train_images, "latency": LATENCY_NOTE, "lam": best_lam(args),
             "schedule": "SGD lr 0.01 cosine per stage", "raw lines": "benchmarks/results/edp_fmnist_runs.jsonl",
             "baselines": "equal-epoch L1/KD and the dense control: benchmarks/results/cascade_fmnist_runs.jsonl"}
    print(open(write_results("edp_fmnist", rows, cols, extra)).read())


def main() -> None:
    """Run parts of the grid, or the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=["sweep", "main", "walltime", "ablation"],
                   default=["sweep", "main", "walltime", "ablation"])
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--kd-alpha", type=float, default=0.9)
    p.add_argument("--sparse-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs/edp_fmnist"))
    p.add_argument("--cascade-runs", type=Path, default=Path("runs/cascade_fmnist"), help="baseline models (latency)")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, test, base = subset_inputs(args.train_images, args.seed, BASE)
    if args.report:
        report(args, base, train, test)
        return
    for part in args.only:
        run_part(args, part, base, train, test)


if __name__ == "__main__":
    main()
