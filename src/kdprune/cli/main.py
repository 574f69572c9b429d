"""The `kdprune` command: a thin argparse layer over the library's functions."""
from __future__ import annotations

import argparse
import os
import sys

# Before torch loads libgomp: spinning OpenMP threads are 5-50x slower when another process
# holds a core (measured here on 2 shared cores); sleeping threads cost little when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kdprune.cli import compress_cmd, eval_cmd, info_cmd, train_cmd

COMMANDS = (train_cmd, compress_cmd, eval_cmd, info_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-command per module in COMMANDS."""
    p = argparse.ArgumentParser(prog="kdprune", description="Structured pruning of CNNs guided by "
                                "knowledge distillation: train, compress, evaluate, inspect.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return p


def _version() -> str:
    import kdprune

    return f"kdprune {kdprune.__version__}"


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch; user errors print one line, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kdprune {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
