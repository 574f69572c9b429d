"""Peak resident memory of OED training (K replicas + the online teacher) on the CPU.

    python benchmarks/oed_memory.py --model resnet56 --replicas 3 --batch-size 128

Three optimiser steps of OED on Fashion-MNIST images plus the finish (replica selection, folding,
removal), one thread; prints the peak RSS (ru_maxrss) in GiB.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see kdprune.cli.main

import argparse
import json
import resource
import time

import torch

import kdprune as kp


def main() -> None:
    """Run the short OED cycle and print its peak memory."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    train = kp.data.load("fashion-mnist")[0].subset(2048)
    cfg = kp.TrainConfig(epochs=1, batch_size=args.batch_size, max_steps_per_epoch=3, optimizer=kp.SGD(lr=0.01),
                         progress=False, eval_batch_size=args.batch_size)
    start = time.perf_counter()
    kp.compress(kp.create_model(args.model, num_classes=10, in_chans=1),
                kp.recipes.OED(replicas=args.replicas, finetune=cfg, select_val=256), train, None, latency=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({**vars(args), "peak_rss_gib": round(peak, 2), "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
