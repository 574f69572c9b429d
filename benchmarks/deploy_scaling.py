"""Why the pruned Fashion-MNIST ResNet-20s miss the FLOPs ratio (issue 14): the same prune on wider
copies of the network, interleaved, on eager torch and onnxruntime.

Speed depends on the shapes only, so the models are randomly initialised and pruned without
fine-tuning: L1 ranking (L1Finetune's uniform allocation) to 50% and 25% of FLOPs, with free widths
and with widths rounded to 8. If a fixed cost per layer call is what keeps the speed-up below the
FLOPs ratio, the fraction of the ratio reached grows with the width multiplier.

    python benchmarks/deploy_scaling.py                    # ~5 min on a quiet 2-core machine
    python benchmarks/deploy_scaling.py --mults 1 --rounds 3 --name deploy_scaling_smoke
"""
from __future__ import annotations

import argparse
import copy

import torch

import kdprune as kp
from common import write_results


def _random_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN statistics and affine terms, so the L1 ranking and the outputs are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _variants(mult: int, size: int, targets: list[float], seed: int) -> dict[str, torch.nn.Module]:
    """The dense ResNet-20 at ``mult`` times the widths and its pruned copies (structure only)."""
    torch.manual_seed(seed)
    dense = _random_bn(kp.create_model("resnet20", num_classes=10, in_chans=1,
                                       widths=[16 * mult, 32 * mult, 64 * mult]), seed)
    x = torch.randn(1, 1, size, size)
    out = {"dense": dense}
    for t in targets:
        for widths in (kp.engine.FreeWidths(), kp.engine.RoundTo(8)):
            m = copy.deepcopy(dense)
            try:
                kp.engine.prune_to_target(m, x, kp.engine.Target(flops=t), widths=widths)
            except ValueError as e:  # a rounding grid that cannot land within 1%: say so, go on
                print(f"x{mult} {size}px flops {t} {type(widths).__name__}: {e}")
                continue
            name = "free" if isinstance(widths, kp.engine.FreeWidths) else "round 8"
            out[f"{t:.0%} FLOPs, {name}"] = m.eval()
    return out


def _rows(mult: int, size: int, models: dict[str, torch.nn.Module], args: argparse.Namespace) -> list[dict]:
    x = torch.randn(1, 1, size, size)
    flops = {k: kp.metrics.complexity(m, example_input=x).flops for k, m in models.items()}
    backends = [kp.metrics.Backend(b) for b in args.backends]
    lat = kp.metrics.compare_backends(models, (1, size, size), backends, (1, 64), threads=args.threads,
                                      rounds=args.rounds)
    rows = []
    for name in models:
        ratio = flops["dense"] / flops[name]
        for b in backends:
            row = {"width": f"x{mult}", "input": f"{size}x{size}", "model": name, "backend": b.value,
                   "dense_ms_bs64": round(lat["dense"][b.value][64]["median_ms"], 2),
                   "flops_ratio": round(ratio, 2)}
            for bs in (1, 64):
                sp = lat[name][b.value][bs]["speedup"]
                row[f"speedup_bs{bs}"], row[f"of_ratio_bs{bs}"] = round(sp, 2), round(sp / ratio, 2)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mults", type=int, nargs="+", default=[1, 2, 4], help="width multipliers of ResNet-20")
    p.add_argument("--size", type=int, default=28, help="input height and width")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25], help="FLOPs fractions to keep")
    p.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="deploy_scaling")
    args = p.parse_args()
    rows = []
    for mult in args.mults:
        rows += _rows(mult, args.size, _variants(mult, args.size, args.targets, args.seed), args)
    cols = {"width": "widths", "input": "input", "model": "model", "backend": "backend",
            "dense_ms_bs64": "dense ms bs64", "flops_ratio": "FLOPs ratio",
            "speedup_bs1": "speed-up bs1", "of_ratio_bs1": "of ratio bs1",
            "speedup_bs64": "speed-up bs64", "of_ratio_bs64": "of ratio bs64"}
    extra = {"models": "ResNet-20 option A, random weights and BN statistics, L1 uniform prune, no fine-tune",
             "latency": f"median of {args.rounds} interleaved rounds per width, {args.threads} thread(s)"}
    print(open(write_results(args.name, rows, cols, extra)).read())


if __name__ == "__main__":
    main()
