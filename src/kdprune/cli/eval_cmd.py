"""`kdprune eval`: load a trained or pruned model (no pickle) and report accuracy, size, latency."""
from __future__ import annotations

import argparse
import json

from kdprune.cli.common import add_data_args, load_source_data, model_dir, source_path


def add_parser(sub) -> None:
    """Register the `eval` sub-command."""
    p = sub.add_parser("eval", help="evaluate a saved model directory",
                       description="Evaluate a run directory from `kdprune train`/`compress` or a saved "
                                   "model directory (structure.json + model.safetensors).")
    p.add_argument("path", help="run directory or saved model directory")
    add_data_args(p)
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch size")
    p.add_argument("--latency", action="store_true", help="also measure CPU latency (batch 1 and 64)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load, evaluate, print."""
    import kdprune as kp

    path = source_path(args.path)
    model = kp.load_pruned(model_dir(path))
    data, _, val = load_source_data(path, args)
    report = {"model": str(path), "data": data["data"], **kp.evaluate(model, val, batch_size=args.batch_size)}
    report.update(kp.complexity(model, input_size=(1, *val.images.shape[1:])).as_dict())
    if args.latency:
        lat = kp.metrics.measure_latency(model, tuple(val.images.shape[1:]))
        report["latency_ms"] = {bs: r["median_ms"] for bs, r in lat.items()}
    print(json.dumps(report, indent=2) if args.json else _format(report))
    return 0


def _format(r: dict) -> str:
    lines = [f"{r['model']} on {r['data']} ({int(r['n'])} images)",
             f"  top1 {r['top1']:.2f}%  top5 {r['top5']:.2f}%  loss {r['loss']:.4f}",
             f"  params {r['params']:,}  MACs {r['macs']:,}  FLOPs {r['flops']:,}"]
    if "latency_ms" in r:
        lines.append("  latency " + "  ".join(f"bs{b}: {ms:.2f} ms" for b, ms in r["latency_ms"].items()))
    return "\n".join(lines)
