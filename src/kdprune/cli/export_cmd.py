"""`kdprune export`: write a saved model as ONNX / TorchScript / ExportedProgram through kp.export
(dynamic batch, BN folded, parity-checked on real images when the run's data set is at hand)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kdprune.cli.common import run_data_name
from kdprune.cli.user_model import add_model_args, load_cli_model

FORMATS = ("onnx", "torchscript", "exported-program")


def add_parser(sub) -> None:
    """Register the `export` sub-command."""
    p = sub.add_parser("export", help="export a saved model (ONNX, TorchScript, ExportedProgram) with a parity check",
                       description="Export a run directory from `kdprune train`/`compress` or a saved model "
                                   "directory, check the artefact against the eager model, and write a sidecar "
                                   "JSON (<file>.json) with input shape, normalisation, source hash and parity.")
    p.add_argument("path", nargs="?", help="run directory, saved model directory, or pretrained:NAME (or --factory "
                                           "+ --weights)")
    add_model_args(p)
    p.add_argument("--format", choices=FORMATS, default="onnx", help="artefact format (default onnx)")
    p.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="fold each BatchNorm into the conv before it (default on)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 18; --format onnx only)")
    p.add_argument("--out", help="artefact path (default: PATH/model.onnx, model.torchscript.pt or model.pt2)")
    p.add_argument("--data", help="data set for normalisation and real parity inputs (default: the run's)")
    p.add_argument("--data-root", help="folder holding the data set files")
    p.add_argument("--parity-samples", type=int, default=64,
                   help="validation images for the parity check (default 64)")
    p.add_argument("--input-size", type=int, help="input height = width when no data set or recorded shape gives it")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default 1e-4)")
    p.add_argument("--json", action="store_true", help="print the sidecar as JSON")
    p.set_defaults(func=run)


def _data(path: Path, args: argparse.Namespace) -> tuple[Any, Any] | None:
    """(train, val) of the data set named by --data or recorded by the run; None if there is none."""
    import kdprune as kp

    name, root = run_data_name(path)
    name, root = args.data or name, args.data_root or root
    if name is None:
        return None
    try:
        return kp.data.load(name, **({"root": root} if root else {}))
    except FileNotFoundError as e:
        if args.data:  # asked for explicitly: its absence is the user's error
            raise
        print(f"kdprune export: note: the run's data set is not available ({str(e).splitlines()[0]}); "
              "parity runs on seeded random inputs and the sidecar records no normalisation", file=sys.stderr)
        return None


def _example_shape(model: Any, args: argparse.Namespace, data: tuple[Any, Any] | None) -> tuple[int, ...]:
    from kdprune.engine.structure import get_structure

    if data is not None:
        return (1, *data[1].images.shape[1:])
    log = get_structure(model)
    if args.input_size is None and log is not None and log.input_shape:
        return tuple(log.input_shape)
    size = args.input_size or 28
    return (1, int(getattr(model, "in_chans", 1)), size, size)


def _out_path(path: Path, args: argparse.Namespace, suffix: str) -> Path:
    from kdprune.models.pretrained import PREFIX

    if args.out:
        return Path(args.out)
    if path.is_file():  # --weights FILE: the artefact beside it
        return path.with_name(path.stem + suffix)
    if str(args.path).startswith(PREFIX):
        raise ValueError("give --out for a shipped base (its folder is part of the installed package)")
    return path / f"model{suffix}"


def run(args: argparse.Namespace) -> int:
    """Load, export through kp.export, print where it went and how parity went."""
    import torch

    import kdprune as kp
    from kdprune.data.transforms import normalize
    from kdprune.io import Normalization
    from kdprune.registry import choices_of

    fmt = choices_of(kp.ExportFormat)[args.format]
    model, _, path = load_cli_model(args.path, args)
    data = _data(path, args)
    example = torch.randn(*_example_shape(model, args, data), generator=torch.Generator().manual_seed(0))
    inputs = norm = None
    if data is not None:
        train, val = data
        norm = Normalization(train.mean, train.std)
        inputs = normalize(val.images[: args.parity_samples], train.mean, train.std)
    res = kp.export(model, _out_path(path, args, fmt.suffix), fmt, example, fold_bn=args.fold_bn, opset=args.opset,
                    inputs=inputs, normalization=norm, tolerance=args.tolerance)
    print(json.dumps(res.record, indent=2) if args.json else _format(res))
    return 0


def _format(res: Any) -> str:
    p = res.parity
    lines = [f"wrote {res.path} ({res.format.value}, {len(res.folded)} BatchNorm folded), sidecar {res.sidecar}"]
    if p is not None:
        agree = "" if p.argmax_agreement is None else f", argmax agreement {p.argmax_agreement:.1%}"
        lines.append(f"  parity: max abs diff {p.max_abs_diff:.2e} <= {p.tolerance:g} on {p.inputs}, "
                     f"batch sizes {list(p.batch_sizes)}{agree}")
    return "\n".join(lines)
