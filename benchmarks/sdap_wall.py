"""SDAP's cost against KDFinetune's at equal epochs (issue 16's goal: SDAP <= 1.3x), timed
interleaved so that both see the same load: KDFinetune, SDAP (masked channels removed after the
ramp) and SDAP with ``remove_each_epoch`` (also cut at every epoch end of the ramp), each the
kd_pays schedule (6 epochs, ramp 3, SGD 0.01 cosine) capped at ``--steps`` steps per epoch, from
the shipped option-B base, one thread.

    python benchmarks/sdap_wall.py --steps 20 --rounds 3 --target-params 0.25
    python benchmarks/sdap_wall.py --steps 20 --rounds 3 --target-params 0.25 --ramp-epochs 1 --name sdap_wall_ramp1

Per method: the median over rounds of the summed epoch times (training only) and of the whole
compress call (plus the pruning searches and folds, which a full-length run amortises over
~156 steps per epoch, not ``--steps``); ratios to KDFinetune's. The accuracy of these capped runs
means nothing. Results: benchmarks/results/sdap_wall.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import copy
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import kdprune as kp
from common import write_results


def recipes(target: dict, steps: int, ramp: int) -> dict:
    """The runs of one round, as kd_pays.yaml has them, capped at ``steps`` per epoch (with a
    1-epoch ramp there is nothing to cut before the removal: one SDAP run)."""
    ft = kp.TrainConfig(epochs=6, optimizer=kp.SGD(lr=0.01), schedule=kp.Cosine(), max_steps_per_epoch=steps,
                        progress=False, seed=0)
    sdap = kp.recipes.SDAP(**target, finetune=ft, ramp_epochs=ramp, remove_each_epoch=False)
    runs = {"KDFinetune": kp.recipes.KDFinetune(**target, finetune=ft)}
    if ramp <= 1:
        return {**runs, f"SDAP, ramp {ramp}": sdap}
    return {**runs, "SDAP, removal after the ramp": sdap,
            "SDAP, cut each epoch (default)": replace(sdap, remove_each_epoch=True)}


def timed(base, recipe, train) -> tuple[float, float, list[float]]:
    """(summed epoch seconds, compress wall seconds, epoch seconds) of one run."""
    with tempfile.TemporaryDirectory() as out:
        rep = kp.compress(copy.deepcopy(base), recipe, train, None, out_dir=Path(out), latency=False,
                          progress=False).report
    history = rep["method"].get("train") or rep["method"]["finetune"]  # SDAP's / KDFinetune's epochs
    epochs = [h["epoch_time_s"] for h in history]
    return sum(epochs), rep["wall_time_s"], epochs


def main() -> None:
    """Interleave the three runs for ``--rounds`` rounds; report medians and ratios to KDFinetune."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="resnet20b-fmnist", help="shipped base (kp.pretrained name)")
    p.add_argument("--steps", type=int, default=20, help="steps per epoch (of ~156 in the full runs)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ramp-epochs", type=int, default=3, help="SDAP's ramp (kd_pays: 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="sdap_wall", help="results file name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-params", type=float)
    g.add_argument("--target-flops", type=float)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target = ({"target_flops": args.target_flops} if args.target_flops
              else {"target_params": args.target_params or 0.25})
    train, _ = kp.data.load("fashion-mnist")  # capped epochs: which images hardly matters
    base = kp.pretrained(args.base)
    runs = recipes(target, args.steps, args.ramp_epochs)
    seen: dict[str, list[tuple[float, float, list[float]]]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, recipe in runs.items():
            seen[name].append(timed(base, recipe, train))
            print(f"round {r + 1}: {name}: {seen[name][-1][0]:.1f} s of epochs, {seen[name][-1][1]:.1f} s in all",
                  flush=True)
    med = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs)) for k, vs in seen.items()}
    kd = med["KDFinetune"]
    rows = [{"method": k, "epochs_s": round(e, 1), "vs_kd": round(e / kd[0], 2), "wall_s": round(w, 1),
             "wall_vs_kd": round(w / kd[1], 2),
             "epoch_s": " / ".join(f"{statistics.median(v[2][i] for v in seen[k]):.1f}" for i in range(6))}
            for k, (e, w) in med.items()]
    cols = {"method": "method", "epochs_s": "epochs s (median)", "vs_kd": "x KDFinetune", "epoch_s":
            "per epoch s (median)", "wall_s": "compress s (median)", "wall_vs_kd": "x KDFinetune (compress)"}
    print(write_results(args.name, rows, cols, {"target": target, "steps_per_epoch": args.steps,
                                                "rounds": args.rounds, "threads": args.threads,
                                                "ramp_epochs": args.ramp_epochs}).read_text())


if __name__ == "__main__":
    main()
