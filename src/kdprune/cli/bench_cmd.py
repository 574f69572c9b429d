"""`kdprune bench`: run a bench config's grid (resumable, one JSONL line per finished run), then
write its table and Pareto plots."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    """Register the `bench` sub-command."""
    p = sub.add_parser("bench", help="methods x targets x seeds from one base -> JSONL, table, Pareto PNGs",
                       description="Run every run of a bench config (see docs/bench.md) whose line is not in "
                                   "its results JSONL yet, appending each line as soon as the run finishes "
                                   "(a killed bench resumes where it stopped), then write the Markdown table "
                                   "(mean ± std over seeds) and the Pareto PNGs beside the JSONL.")
    p.add_argument("config", help="bench YAML, e.g. benchmarks/quick.yaml")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these method labels (and `control` for the dense + same-epochs control)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="run only these of the config's seeds (e.g. ablations on seed 0 first)")
    p.add_argument("--no-equal-wall", action="store_true",
                   help="skip the equal-wall runs (the equal-epochs grid first; a later call runs them)")
    p.add_argument("--report-only", action="store_true", help="run nothing: table and plots from the JSONL")
    p.add_argument("--threads", type=int, help="torch CPU threads (overrides the config's budget.threads)")
    p.add_argument("--no-latency", action="store_true",
                   help="do not time the models at report time (stored latency is still shown)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, run what is missing, write the report."""
    from kdprune.bench import load_config, run_bench, write_report

    cfg = load_config(args.config)
    if args.threads:
        cfg = cfg.with_threads(args.threads)
    if not args.report_only:
        run_bench(cfg, only=args.only, seeds=args.seeds, equal_wall=not args.no_equal_wall,
                  command=" ".join(["kdprune", *sys.argv[1:]]))
    rep = write_report(cfg, latency=not args.no_latency)
    print(rep.markdown)
    print(f"wrote {rep.table}" + "".join(f", {p}" for p in rep.plots))
    return 0
