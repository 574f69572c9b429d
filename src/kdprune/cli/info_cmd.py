"""`kdprune info`: model summary (layers, widths, params, FLOPs) or the zoo/data set lists."""
from __future__ import annotations

import argparse

from kdprune.cli.user_model import add_model_args


def add_parser(sub) -> None:
    """Register the `info` sub-command."""
    p = sub.add_parser("info", help="summarise a model: layers, widths, params, FLOPs",
                       description="Summarise a zoo model (--model) or a saved model directory (path).")
    p.add_argument("path", nargs="?", help="saved model or run directory (instead of --model)")
    p.add_argument("--model", help="zoo model name")
    p.add_argument("--num-classes", type=int, default=10, help="classes for --model (default 10)")
    p.add_argument("--in-chans", type=int, default=1, help="input channels for --model (default 1)")
    p.add_argument("--input-size", type=int, default=28, help="input height = width (default 28)")
    p.add_argument("--list", action="store_true", help="list zoo models and data sets")
    add_model_args(p)
    p.add_argument("--layers", action="store_true", help="print the per-layer table")
    p.add_argument("--groups", action="store_true",
                   help="which convs/linears pruning can narrow, and why the others stay whole")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary."""
    import kdprune as kp
    from kdprune.cli.user_model import load_cli_model
    from kdprune.metrics import format_table, layer_table

    if args.list:
        print("models:   " + ", ".join(kp.list_models()))
        print("datasets: " + ", ".join(kp.data.list_datasets()))
        print("shipped bases (--from pretrained:NAME): " + ", ".join(kp.list_pretrained()))
        return 0
    if args.path or args.weights or args.factory:
        model = load_cli_model(args.path, args)[0]
        in_chans = getattr(model, "in_chans", args.in_chans)
    elif args.model:
        model = kp.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
        in_chans = args.in_chans
    else:
        raise ValueError("give a saved model or run directory, --model NAME, or --list")
    size = (1, in_chans, args.input_size, args.input_size)
    c = kp.complexity(model, input_size=size)
    if args.layers:
        cols = ["name", "type", "in", "out", "kernel", "groups", "params", "macs"]
        print(format_table(layer_table(model, input_size=size), cols))
    if args.groups:
        _print_groups(model, size)
    name = getattr(model, "kdprune_spec", {}).get("name", type(model).__name__)
    print(f"{name}: params {c.params:,}  MACs {c.macs:,}  FLOPs {c.flops:,}  at input {size}")
    return 0


def _print_groups(model, size: tuple[int, ...]) -> None:
    """The engine's coverage report (kp.engine.describe) as a table plus a one-line summary."""
    import torch

    from kdprune.engine import describe
    from kdprune.metrics import format_table

    rows = describe(model, torch.zeros(*size))
    table = [{"name": r.name, "type": r.type, "out": r.out_channels, "prunable": "yes" if r.prunable else "no",
              "group": r.group or "-", "reason": r.reason} for r in rows]
    print(format_table(table, ["name", "type", "out", "prunable", "group", "reason"]))
    n = sum(r.prunable for r in rows)
    print(f"{n} of {len(rows)} conv/linear layers can be narrowed (output channels); "
          f"{len({r.group for r in rows if r.prunable})} prunable channel groups")
