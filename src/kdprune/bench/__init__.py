"""`kdprune bench`: a grid of methods x targets x seeds from one base, each run resumable and its
result appended to a JSONL as soon as it finishes; a Markdown table (mean +- std over seeds, the
dense base and the dense + same-epochs control) and Pareto PNGs, from that JSONL alone. Uses only
kdprune's public layers (methods, training, metrics, io, data)."""
from kdprune.bench.config import (CONTROL, BenchConfig, BenchMethod, Budget, DataSpec, EqualWall, LatencySpec,
                                  build_recipe, config_from_dict, configure, load_config, target_label)
from kdprune.bench.report import (BenchReport, aggregate, measure_latency, paired, pareto_front, plot_pareto,
                                  write_report)
from kdprune.bench.results import append_line, read_lines
from kdprune.bench.run import BenchData, RunSpec, grid, load_base, prepare_data, run_bench, wall_runs

__all__ = [
    "CONTROL", "BenchConfig", "BenchMethod", "Budget", "DataSpec", "EqualWall", "LatencySpec",
    "build_recipe", "config_from_dict", "configure", "load_config", "target_label",
    "BenchReport", "aggregate", "measure_latency", "paired", "pareto_front", "plot_pareto", "write_report",
    "append_line", "read_lines",
    "BenchData", "RunSpec", "grid", "load_base", "prepare_data", "run_bench", "wall_runs",
]
