"""`kdprune eval`: load a trained or pruned model (no pickle) and report accuracy, size, latency."""
from __future__ import annotations

import argparse
import json
import sys

from kdprune.cli.common import add_data_args, load_source_data
from kdprune.cli.user_model import add_model_args, load_cli_model

BACKENDS = ("eager", "channels-last", "torchscript", "onnxruntime")


def add_parser(sub) -> None:
    """Register the `eval` sub-command."""
    p = sub.add_parser("eval", help="evaluate a saved model directory",
                       description="Evaluate a run directory from `kdprune train`/`compress` or a saved "
                                   "model directory (structure.json + model.safetensors).")
    p.add_argument("path", nargs="?", help="run directory or saved model directory (or --factory + --weights)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch size")
    p.add_argument("--latency", action="store_true", help="also measure CPU latency (batch 1 and 64)")
    p.add_argument("--backend", nargs="+", choices=[*BACKENDS, "all"], metavar="BACKEND",
                   help=f"latency backends, timed interleaved ({', '.join(BACKENDS)}, all; default eager); "
                        "implies --latency")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per backend and batch size (default 20)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load, evaluate, print."""
    import kdprune as kp

    model, _, path = load_cli_model(args.path, args)
    data, _, val, _ = load_source_data(path, args)
    report = {"model": str(path), "data": data["data"], **kp.evaluate(model, val, batch_size=args.batch_size)}
    report.update(kp.complexity(model, input_size=(1, *val.images.shape[1:])).as_dict())
    if args.latency or args.backend:
        report.update(_latency(model, tuple(val.images.shape[1:]), args))
    print(json.dumps(report, indent=2) if args.json else _format(report))
    return 0


def _format(r: dict) -> str:
    lines = [f"{r['model']} on {r['data']} ({int(r['n'])} images)",
             f"  top1 {r['top1']:.2f}%  top5 {r['top5']:.2f}%  loss {r['loss']:.4f}",
             f"  params {r['params']:,}  MACs {r['macs']:,}  FLOPs {r['flops']:,}"]
    if "latency" in r:
        lines += _format_latency(r["latency"])
    return "\n".join(lines)


def _format_latency(lat: dict) -> list[str]:
    names = list(lat["backends"])
    many = len(names) > 1
    head = f"  latency: interleaved medians, {lat['threads']} thread(s), {lat['rounds']} rounds"
    lines = [head + (f"; (x) = speed-up over {names[0]}" if many else "")]
    for name, per_bs in lat["backends"].items():
        cells = []
        for bs, s in per_bs.items():
            cells.append(f"bs{bs}: {s['median_ms']:.2f} ms" + (f" ({s['vs_first_backend']:.2f}x)" if many else ""))
        lines.append(f"    {name:<14} " + "  ".join(cells))
    return lines


def _backends(names: list[str] | None) -> list:
    """The typed backends the --backend names select (`all`: every installed one)."""
    from kdprune.metrics import Backend, available_backends
    from kdprune.registry import choices_of

    if not names:
        return [Backend.EAGER]
    if "all" in names:
        found = list(available_backends())
        if Backend.ONNXRUNTIME not in found:
            print("kdprune eval: note: onnxruntime is not installed, so `all` skips it", file=sys.stderr)
        return found
    picked = [choices_of(Backend)[n] for n in dict.fromkeys(names)]
    if Backend.ONNXRUNTIME in picked and Backend.ONNXRUNTIME not in available_backends():
        raise ValueError("--backend onnxruntime needs onnx, onnxscript and onnxruntime: "
                         "`pip install -c constraints.txt onnx onnxruntime onnxscript`")
    return picked


def _latency(model, input_size: tuple[int, ...], args: argparse.Namespace) -> dict:
    """Interleaved medians per backend at batch 1 and 64 (the first backend also fills latency_ms)."""
    from kdprune.metrics import compare_backends

    backends = _backends(args.backend)
    res = compare_backends({"model": model}, input_size, backends, batch_sizes=(1, 64), threads=args.threads,
                           rounds=args.rounds)["model"]
    keep = ("median_ms", "p10_ms", "p90_ms", "vs_first_backend")
    per = {b: {bs: {k: s[k] for k in keep} for bs, s in v.items()} for b, v in res.items()}
    first = next(iter(res.values()))
    threads = next(iter(first.values()))["threads"]
    return {"latency_ms": {bs: s["median_ms"] for bs, s in first.items()},
            "latency": {"threads": threads, "rounds": args.rounds, "backends": per}}
