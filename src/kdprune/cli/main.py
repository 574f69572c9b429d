"""The `kdprune` command: a thin argparse layer over the library's functions."""
from __future__ import annotations

import argparse
import sys

# Importing kdprune (the package, first) sets OMP_WAIT_POLICY=PASSIVE unless the user set it.
from kdprune.cli import bench_cmd, compress_cmd, eval_cmd, export_cmd, info_cmd, train_cmd

COMMANDS = (train_cmd, compress_cmd, eval_cmd, export_cmd, info_cmd, bench_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per module in COMMANDS."""
    p = argparse.ArgumentParser(prog="kdprune", description="Structured pruning of CNNs guided by "
                                "knowledge distillation: train, compress, evaluate, export, inspect.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return p


def _version() -> str:
    import kdprune

    return f"kdprune {kdprune.__version__}"


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch; user errors print one line and exit 2, Ctrl-C exits 130, no traceback."""
    from kdprune.training.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # ImportError: an optional dependency (onnx, onnxruntime) is missing; the message says what to install
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, CheckpointError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kdprune {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; the last checkpoint in {out} is kept: add --resume to continue" if out else ""
        print(f"kdprune {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
