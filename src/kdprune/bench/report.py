"""The bench report, from the results JSONL alone: a Markdown table (mean +- std over seeds per
method, budget and target, with the dense base and the dense + same-epochs control) and Pareto
PNGs (accuracy vs FLOPs kept; accuracy vs CPU latency measured at report time, interleaved, on
the models still in runs/, kept in a ``.latency.json`` beside the JSONL for later sessions)."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kdprune.bench.config import BenchConfig
from kdprune.bench.results import describe_machine, group_key, provenance, read_lines
from kdprune.bench.run import BASE_LABEL, BASE_RUN, CONTROL_LABEL, EQUAL_EPOCHS, load_base
from kdprune.io import load_pruned
from kdprune.metrics import compare_latency, format_markdown

__all__ = ["BenchReport", "aggregate", "paired", "measure_latency", "write_report", "plot_pareto", "pareto_front",
           "report_paths", "LATENCY_SUFFIX"]

LATENCY_SUFFIX = ".latency.json"


@dataclass
class BenchReport:
    """What ``write_report`` wrote: the table (also as text and rows) and the plots."""

    markdown: str
    table: Path
    plots: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def report_paths(cfg: BenchConfig) -> dict[str, Path]:
    """Where the table, the plots and the stored latency go: beside the results JSONL."""
    r = cfg.results
    return {"table": r.with_suffix(".md"), "flops_png": r.with_name(r.stem + "_pareto_flops.png"),
            "latency_png": r.with_name(r.stem + "_pareto_latency.png"), "latency": r.with_suffix(LATENCY_SUFFIX)}


def _key_str(key: tuple) -> str:
    label, budget, metric, value = key
    return f"{label} | {budget} | {metric} {value:g}" if metric else f"{label} | {budget}"


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _row(key: tuple, lines: list[dict]) -> dict[str, Any]:
    """One table row from the lines of one (method, budget, target) across seeds."""
    label, budget, metric, value = key
    row: dict[str, Any] = {"key": _key_str(key), "method": label, "recipe": lines[0].get("recipe", ""),
                           "budget": budget, "target": f"{metric} {value:g}" if metric else "-",
                           "runs": [r["run"] for r in lines], "seeds": [r.get("seed") for r in lines]}
    ok = [r for r in lines if "error" not in r and r.get("top1") is not None]
    if not ok:
        row.update(note=f"failed: {lines[0].get('error', 'no result')}"[:160], n=0)
        return row
    m, s = _stats([r["top1"] for r in ok])
    bases = [r["base_top1"] for r in ok if r.get("base_top1") is not None]
    shown = f"{m:.2f} ± {s:.2f} ({len(ok)})" if len(ok) > 1 else f"{m:.2f}"
    row.update(top1_mean=m, top1_std=s, n=len(ok), top1=shown,
               delta=round(m - statistics.fmean(bases), 2) if bases else None,
               flops_kept=round(statistics.fmean(r["flops_kept"] for r in ok), 4),
               params_kept=round(statistics.fmean(r["params_kept"] for r in ok), 4),
               epochs="/".join(str(e) for e in sorted({r.get("epochs") for r in ok})),
               wall_s=round(statistics.fmean(r["wall_s"] for r in ok)) if all("wall_s" in r for r in ok) else None)
    if all(r.get("train_flops") for r in ok):  # counted training compute, in TFLOPs (10^12)
        row["train_tflops"] = round(statistics.fmean(r["train_flops"] for r in ok) / 1e12, 2)
    for key in ("val_top1", *_REMOVAL):  # the held-out split every choice is read off (the test is only reported)
        vals = [r[key] for r in ok if r.get(key) is not None]
        if vals and len(vals) == len(ok):
            vm, vs = _stats(vals)
            row[key] = f"{vm:.2f} ± {vs:.2f}" if len(vals) > 1 else f"{vm:.2f}"
    notes = [f"{len(lines) - len(ok)} failed run(s)"] if len(ok) < len(lines) else []
    resumed = sum(1 for r in ok if r.get("resumed"))
    if resumed:  # a resumed run's wall time misses what the killed process spent outside its epochs
        notes.append(f"{resumed} resumed: wall is a lower bound")
    if notes:
        row["note"] = "; ".join(notes)
    return row


def _first_per_run(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per run tag, the first: two bench processes started together both write the base's."""
    seen: set[Any] = set()
    out = []
    for r in lines:
        if r.get("run") not in seen:
            seen.add(r.get("run"))
            out.append(r)
    return out


def aggregate(lines: Sequence[dict[str, Any]], methods: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Table rows: the dense base, the controls (by epochs), then per target (in first-seen order)
    the equal-epochs rows and then the equal-wall rows, each in the order of ``methods`` (the
    config's labels; others after them, as first seen); a run's repeated line counts once."""
    groups: dict[tuple, list[dict]] = {}
    for r in _first_per_run(lines):
        control = r["method"] == CONTROL_LABEL  # one row per epoch count
        key = (r["method"], f"same epochs ({r.get('epochs')})", None, None) if control else group_key(r)
        groups.setdefault(key, []).append(r)
    special = {BASE_LABEL: 0, CONTROL_LABEL: 1}
    targets = list(dict.fromkeys(k[2:] for k in groups if k[0] not in special))
    order = list(groups)
    position = {label: i for i, label in enumerate(methods)}

    def rank(k: tuple) -> tuple:
        if k[0] in special:
            return (special[k[0]], 0, 0, 0, order.index(k))
        return (2, targets.index(k[2:]), k[1] != EQUAL_EPOCHS, position.get(k[0], len(position)), order.index(k))

    return [_row(k, groups[k]) for k in sorted(groups, key=rank)]


def _mean_std(values: list[float]) -> str:
    m, s = _stats(values)
    return f"{m:+.2f} ± {s:.2f}" if len(values) > 1 else f"{m:+.2f}"


def paired(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each equal-wall row against its reference run on the same seeds: the mean difference
    (and its std over seeds) in test and val top-1, so seed-to-seed spread cancels."""
    ok = {r["run"]: r for r in _first_per_run(lines) if "error" not in r and r.get("top1") is not None}
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in ok.values():
        ref = ok.get((r.get("reference") or {}).get("run"))
        if ref is not None:
            groups.setdefault(group_key(r), []).append((r, ref))
    rows = []
    for (label, budget, metric, value), pairs in groups.items():
        pairs.sort(key=lambda p: p[0].get("seed") or 0)
        vals = [(a["val_top1"], b["val_top1"]) for a, b in pairs if a.get("val_top1") is not None
                and b.get("val_top1") is not None]
        rows.append({"method": label, "budget": budget, "target": f"{metric} {value:g}",
                     "reference": pairs[0][1]["method"], "seeds": "/".join(str(a.get("seed")) for a, _ in pairs),
                     "epochs": "/".join(str(a.get("epochs")) for a, _ in pairs),
                     "d_top1": _mean_std([a["top1"] - b["top1"] for a, b in pairs]),
                     "d_val": _mean_std([a - b for a, b in vals]) if len(vals) == len(pairs) else None})
    return rows


_PAIRED_COLUMNS = {"method": "method", "budget": "budget", "target": "target (kept)", "reference": "against",
                   "seeds": "seeds", "epochs": "epochs (per seed)", "d_top1": "Δ test top-1", "d_val": "Δ val top-1"}


def _models(cfg: BenchConfig, rows: list[dict]) -> dict[str, Any]:
    """Per row, the first of its runs whose saved model is still under runs/ (any seed: same size)."""
    found = {}
    for row in rows:
        if row["method"] in (BASE_LABEL, CONTROL_LABEL) or not row.get("n"):
            continue
        saved = [cfg.runs / t / "model" for t in row["runs"]]
        d = next((p for p in saved if (p / "structure.json").is_file()), None)
        if d is not None:
            found[row["key"]] = (d.parent.name, load_pruned(d))
    return found


def measure_latency(cfg: BenchConfig, rows: list[dict], input_shape: Sequence[int]) -> dict[str, Any]:
    """Interleaved CPU latency of the base and of every row's model still under runs/, merged into
    the stored ``.latency.json`` (rows whose models are gone keep their earlier measurement)."""
    path = report_paths(cfg)["latency"]
    stored = json.loads(path.read_text()) if path.is_file() else {"groups": {}}
    found = _models(cfg, rows)
    if not found:
        return stored
    threads = cfg.latency.threads or cfg.budget.threads
    models = {BASE_LABEL: load_base(cfg), **{k: m for k, (_, m) in found.items()}}
    res = compare_latency(models, tuple(input_shape), batch_sizes=cfg.latency.batch_sizes, threads=threads,
                          rounds=cfg.latency.rounds)
    prov = provenance(cfg.machine or describe_machine(threads, "cpu"), "")
    when = {"commit": prov["commit"], "machine": prov["machine"], "date": prov["date"],
            "rounds": cfg.latency.rounds, "threads": threads}
    for key, per in res.items():
        run = found[key][0] if key in found else None
        stored["groups"][key] = {"run": run, "measured": when, "latency": {str(b): v for b, v in per.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1, default=str) + "\n")
    return stored


def _add_latency(rows: list[dict], stored: dict[str, Any], batch_sizes: Sequence[int]) -> None:
    """Stored latency into the rows; the control has the base's architecture, so the base's."""
    groups = stored.get("groups", {})
    for row in rows:
        dense = row["method"] in (BASE_LABEL, CONTROL_LABEL)
        lat = groups.get(BASE_LABEL if dense else row["key"], {}).get("latency") or {}
        for b in batch_sizes:
            if str(b) in lat:
                row[f"lat_bs{b}_ms"] = round(lat[str(b)]["median_ms"], 2)
                row[f"speedup_bs{b}"] = round(lat[str(b)]["speedup"], 2)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower x, higher y), sorted by x."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(rows: Sequence[dict[str, Any]], x_key: str, xlabel: str, path: Path, title: str) -> Path | None:
    """Accuracy (mean +- std over seeds) vs ``x_key`` per method and budget, the dense base and
    control, and the Pareto front; None when no row has ``x_key``."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state in the user's process

    pts = [r for r in rows if r.get(x_key) is not None and r.get("top1_mean") is not None]
    if not pts:
        return None
    fig = Figure(figsize=(9.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[tuple, list[dict]] = {}
    for r in pts:
        series.setdefault((r["method"], r["budget"]), []).append(r)
    colors = matplotlib.colormaps["tab20"].colors  # 20 distinct colours: a full grid has ~15 series
    markers = "osD^v<>pPXh*"
    for i, ((label, budget), rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r[x_key])
        wall = budget == "equal wall"
        ax.errorbar([r[x_key] for r in rs], [r["top1_mean"] for r in rs], yerr=[r["top1_std"] for r in rs],
                    marker="*" if label == BASE_LABEL else markers[i % len(markers)], capsize=3,
                    color=colors[(2 * i + i // 10) % len(colors)], label=f"{label} ({budget})" if wall else label,
                    markersize=11 if label == BASE_LABEL else 6,
                    linestyle=("--" if wall else "-") if len(rs) > 1 else "none")
    front = pareto_front([(r[x_key], r["top1_mean"]) for r in pts])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", alpha=0.5,
            linestyle="--", label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


_COLUMNS = {"method": "method", "recipe": "recipe", "budget": "budget", "target": "target (kept)",
            "top1": "test top-1 %", "delta": "vs base", "flops_kept": "FLOPs kept", "params_kept": "params kept",
            "epochs": "epochs", "train_tflops": "train TFLOPs (counted)", "wall_s": "wall s"}


#: The model right after a method's removal step (before fine-tuning), without and with the BatchNorm
#: re-estimation, scored on the held-out split (on the test set when the bench has none).
_REMOVAL = {"pruned_val_top1": "pruned val %", "recalibrated_val_top1": "+ BN recal. val %",
            "pruned_top1": "pruned test %", "recalibrated_top1": "+ BN recal. test %"}


def _markdown(cfg: BenchConfig, rows: list[dict], lines: list[dict], stored: dict, plots: list[Path]) -> str:
    cols = dict(_COLUMNS)
    if not any("train_tflops" in r for r in rows):  # lines from before the count (issue 36): no column
        cols.pop("train_tflops")
    extra = [("val_top1", "val top-1 %")] if any("val_top1" in r for r in rows) else []
    extra += [(k, v) for k, v in _REMOVAL.items() if any(k in r for r in rows)]
    if extra:  # beside the test columns: the split choices are read off, the removal step's scores
        items, at = list(cols.items()), list(cols).index("delta") + 1
        cols = dict(items[:at] + extra + items[at:])
    for b in cfg.latency.batch_sizes:
        if any(f"lat_bs{b}_ms" in r for r in rows):
            cols.update({f"lat_bs{b}_ms": f"CPU ms bs{b}", f"speedup_bs{b}": f"speed-up bs{b}"})
    cols["note"] = "note"
    shown = [{k: ("-" if r.get(k) is None else r.get(k, "")) for k in cols} for r in rows]
    base = next((r for r in lines if r.get("run") == BASE_RUN), {})
    out = [f"# kdprune bench: {cfg.name}", "", f"Results: `{cfg.results.name}` ({len(lines)} lines); base "
           f"`{cfg.base}`; data {base.get('data', cfg.data.name)}, {base.get('train_images', '?')} training images "
           f"({base.get('val_images', 0)} held out), test {base.get('test_images', '?')} images (reported only).", "",
           format_markdown(shown, cols), ""]
    pairs = paired(lines)
    if pairs:
        out += ["Paired by seed (each row minus its reference run on the same seed; mean ± std over seeds):", "",
                format_markdown([{k: ("-" if r.get(k) is None else r[k]) for k in _PAIRED_COLUMNS} for r in pairs],
                                _PAIRED_COLUMNS), ""]
    out += _footnotes(lines, stored, plots)
    return "\n".join(out) + "\n"


def _footnotes(lines: list[dict], stored: dict, plots: list[Path]) -> list[str]:
    notes = [f"- commits: {', '.join(sorted({str(r.get('commit')) for r in lines}))}",
             f"- machines: {'; '.join(sorted({str(r.get('machine')) for r in lines}))}",
             "- commands: " + "; ".join(sorted({f"`{r.get('command')}`" for r in lines})),
             "- top-1 is mean ± std (n seeds); `vs base` is the mean minus the dense base's test top-1; "
             "equal wall = the baseline fine-tunes for as many epochs as fit in the reference's wall time"]
    measured = [g["measured"] for g in stored.get("groups", {}).values() if g.get("measured")]
    if measured:
        m = measured[-1]
        notes.append(f"- latency: median of {m.get('rounds')} interleaved rounds, {m.get('threads')} thread(s), "
                     f"measured {m.get('date')} on {m.get('machine')} (commit {m.get('commit')}); "
                     "speed-up = dense base median / model median")
    notes += [f"- plot: `{p.name}`" for p in plots]
    return notes


def write_report(cfg: BenchConfig, latency: bool = True) -> BenchReport:
    """Table and Pareto PNGs from ``cfg.results``; with ``latency``, first time the models still
    under runs/ (interleaved, on CPU)."""
    lines = read_lines(cfg.results)
    if not lines:
        raise FileNotFoundError(f"{cfg.results} holds no results yet: run `kdprune bench` on the config first")
    rows = aggregate(lines, [m.label for m in cfg.methods])
    paths = report_paths(cfg)
    base = next((r for r in lines if r.get("run") == BASE_RUN), None)
    stored: dict[str, Any] = json.loads(paths["latency"].read_text()) if paths["latency"].is_file() else {}
    if latency and base is not None:
        stored = measure_latency(cfg, rows, base["input_shape"])
    _add_latency(rows, stored, cfg.latency.batch_sizes)
    seeds = len(set(r.get("seed") for r in lines if r.get("seed") is not None))
    title = f"{cfg.name}: {cfg.base}, {seeds} seed(s)"
    plots = [p for p in (plot_pareto(rows, "flops_kept", "FLOPs kept (fraction of the dense base)",
                                     paths["flops_png"], title),
                         plot_pareto(rows, f"lat_bs{max(cfg.latency.batch_sizes)}_ms",
                                     f"CPU latency at batch {max(cfg.latency.batch_sizes)} (ms, median)",
                                     paths["latency_png"], title)) if p is not None]
    md = _markdown(cfg, rows, lines, stored, plots)
    paths["table"].write_text(md)
    return BenchReport(md, paths["table"], plots, rows)
