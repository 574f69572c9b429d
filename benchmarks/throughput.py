"""Trainer throughput as a ratio to a bare PyTorch loop (same model, batch, data, optimizer), and
the cost of a KD epoch relative to a CE epoch of the same student.

    python benchmarks/throughput.py --model resnet20 --steps 60 --rounds 3

Rounds interleave the three loops (timing on shared CPUs is noisy in bursts); the ratios of
medians go to benchmarks/results/throughput.{json,md}. Targets: kdprune/bare >= 0.95;
KD/CE <= 1.35 (the teacher is a second dense model of the same architecture, frozen: eval mode
under torch.inference_mode).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kdprune as kp
from common import write_results


def bare_loop(model, train, batch_size: int, steps: int, seed: int) -> float:
    """Images/s of the plainest loop: in-memory normalised tensors, SGD, cross-entropy."""
    x_all, y_all = train.normalized(), train.labels
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y_all), generator=g)
    model.train()
    t0 = time.perf_counter()
    for i in range(steps):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def kdprune_loop(model, train, batch_size: int, steps: int, seed: int, task=None) -> float:
    """Images/s of kp.train for the same number of steps (no eval, no augmentation, no bars)."""
    cfg = kp.TrainConfig(epochs=1, batch_size=batch_size, optimizer=kp.SGD(lr=0.05), augment=False,
                         max_steps_per_epoch=steps, progress=False, seed=seed)
    return kp.train(model, train, None, cfg, task=task).history[0]["train_images_per_s"]


def kd_loop(model, train, batch_size: int, steps: int, seed: int) -> float:
    """Images/s of kp.train with KD from a frozen dense teacher of the same architecture."""
    teacher = kp.create_model(model.kdprune_spec["name"], num_classes=10, in_chans=1)
    return kdprune_loop(model, train, batch_size, steps, seed, task=kp.distill.KDTask(teacher))


def main() -> None:
    """Interleave bare and kdprune rounds; report medians and their ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    train, _ = kp.data.load("fashion-mnist")
    rates: dict[str, list[float]] = {"bare": [], "kdprune": [], "kd": []}
    loops = [("bare", bare_loop), ("kdprune", kdprune_loop), ("kd", kd_loop)]
    for r in range(args.rounds):
        order = loops[r % 3:] + loops[:r % 3]  # rotate: each loop runs first, middle and last
        for name, fn in order:
            torch.manual_seed(r)
            model = kp.create_model(args.model, num_classes=10, in_chans=1)
            rates[name].append(fn(model, train, args.batch_size, args.steps, r))
            print(f"round {r} {name}: {rates[name][-1]:.0f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    row = {"model": args.model, "batch": args.batch_size, "steps": args.steps, "rounds": args.rounds,
           "bare_img_s": med["bare"], "kdprune_img_s": med["kdprune"], "ratio": med["kdprune"] / med["bare"],
           "kd_img_s": med["kd"], "kd_epoch_cost": med["kdprune"] / med["kd"]}
    cols = {k: k for k in row}
    print(open(write_results("throughput", [row], cols, {"all_rates": rates})).read())


if __name__ == "__main__":
    main()
