"""The report from a results JSONL alone: mean ± std over seeds per (method, budget, target), the
dense base and control rows, failed runs named, Pareto PNGs; latency kept across sessions."""
import json

import pytest

from kdprune.bench import aggregate, config_from_dict, paired, pareto_front, write_report


def _line(run, method, top1, seed=0, budget="equal epochs", target=0.5, **kw):
    return {"run": run, "method": method, "recipe": kw.pop("recipe", "L1Finetune"), "budget": budget,
            "target_metric": "flops", "target_value": target, "seed": seed, "epochs": 3, "top1": top1,
            "flops_kept": target, "params_kept": target, "wall_s": 10.0, "base_top1": 90.0, "commit": "abc",
            "machine": "m", "command": "kdprune bench x.yaml", **kw}


LINES = [
    {"run": "dense-base", "method": "dense base", "recipe": "dense", "budget": "", "epochs": 0, "top1": 90.0,
     "flops_kept": 1.0, "params_kept": 1.0, "input_shape": [1, 8, 8], "train_images": 100, "commit": "abc",
     "machine": "m", "command": "c"},
    _line("l1-flops0.5-s0", "l1", 88.0), _line("l1-flops0.5-s1", "l1", 89.0, seed=1),
    _line("l1-flops0.25-s0", "l1", 80.0, target=0.25),
    _line("x-flops0.5-s0", "x", None, recipe="OED", error="flops target 0.5 is unreachable"),
    {"run": "control-e3-s0", "method": "dense + same epochs", "recipe": "dense", "budget": "equal epochs",
     "seed": 0, "epochs": 3, "top1": 91.0, "flops_kept": 1.0, "params_kept": 1.0, "wall_s": 5.0, "base_top1": 90.0,
     "commit": "abc", "machine": "m", "command": "c"},
    _line("l1-wall-x-flops0.5-s0", "l1", 89.5, budget="equal wall"),
]


def _cfg(tmp_path):
    path = tmp_path / "results" / "r.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in LINES) + '{"torn": \n')  # a killed write at the end
    return config_from_dict({"base": "base", "targets": [{"flops": 0.5}], "results": "results/r.jsonl",
                             "runs": "runs", "methods": [{"label": "l1", "method": "l1"}]}, root=tmp_path)


def test_rows_mean_std_base_control_and_failures():
    rows = aggregate(LINES)
    assert [(r["method"], r["budget"], r["target"]) for r in rows] == [
        ("dense base", "", "-"), ("dense + same epochs", "same epochs (3)", "-"),
        ("l1", "equal epochs", "flops 0.5"), ("x", "equal epochs", "flops 0.5"), ("l1", "equal wall", "flops 0.5"),
        ("l1", "equal epochs", "flops 0.25")]
    l1 = rows[2]
    assert l1["top1"] == "88.50 ± 0.71 (2)" and l1["delta"] == -1.5
    assert l1["runs"] == ["l1-flops0.5-s0", "l1-flops0.5-s1"]
    assert rows[3]["note"].startswith("failed: flops target 0.5 is unreachable") and rows[3]["n"] == 0
    assert rows[1]["top1"] == "91.00"
    racing = [LINES[0], dict(LINES[0], command="the other process"), *LINES[1:]]  # both wrote the base line
    assert aggregate(racing)[0]["top1"] == "90.00" and aggregate(racing)[0]["n"] == 1


def test_rows_follow_the_config_order_equal_wall_after_equal_epochs():
    lines = [_line("l1-wall-kd-flops0.5-s0", "l1", 89.5, budget="equal wall"), _line("z-flops0.5-s0", "z", 87.0),
             _line("l1-flops0.5-s0", "l1", 88.0), _line("kd-flops0.5-s0", "kd", 89.0)]
    rows = aggregate(lines, ["kd", "l1"])
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("kd", "equal epochs"), ("l1", "equal epochs"), ("z", "equal epochs"), ("l1", "equal wall")]


def test_table_and_plots_from_the_jsonl(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    rep = write_report(cfg, latency=False)
    md = (tmp_path / "results" / "r.md").read_text()
    assert md == rep.markdown and "| l1 | L1Finetune | equal epochs | flops 0.5 | 88.50 ± 0.71 (2) | -1.5" in md
    assert "dense + same epochs" in md and "failed: flops target" in md and "`kdprune bench x.yaml`" in md
    assert [p.name for p in rep.plots] == ["r_pareto_flops.png"]  # no latency measured or stored
    assert rep.plots[0].read_bytes()[:4] == b"\x89PNG"
    assert "not a JSON line" in capsys.readouterr().err


def test_stored_latency_is_reused(tmp_path):
    cfg = _cfg(tmp_path)
    lat = {"1": {"median_ms": 2.0, "speedup": 1.0}, "64": {"median_ms": 40.0, "speedup": 1.0}}
    fast = {"1": {"median_ms": 1.0, "speedup": 2.0}, "64": {"median_ms": 20.0, "speedup": 2.0}}
    (tmp_path / "results" / "r.latency.json").write_text(json.dumps({"groups": {
        "dense base": {"latency": lat, "measured": {"rounds": 15, "threads": 1, "date": "d", "machine": "m"}},
        "l1 | equal epochs | flops 0.5": {"run": "l1-flops0.5-s0", "latency": fast}}}))
    rep = write_report(cfg, latency=True)  # no saved models under runs/: the stored numbers stay
    rows = {(r["method"], r["budget"], r["target"]): r for r in rep.rows}
    assert rows[("l1", "equal epochs", "flops 0.5")]["speedup_bs64"] == 2.0
    assert rows[("dense + same epochs", "same epochs (3)", "-")]["lat_bs64_ms"] == 40.0
    assert [p.name for p in rep.plots] == ["r_pareto_flops.png", "r_pareto_latency.png"]


def test_pareto_front():
    assert pareto_front([(1.0, 90), (0.5, 88), (0.25, 80), (0.5, 85), (0.6, 87)]) == [(0.25, 80), (0.5, 88), (1.0, 90)]


def test_no_results_is_a_clear_error(tmp_path):
    cfg = config_from_dict({"base": "b", "targets": [{"flops": 0.5}], "results": "none.jsonl", "runs": "runs",
                            "methods": [{"label": "l1", "method": "l1"}]}, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no results yet"):
        write_report(cfg)


def test_resumed_runs_are_flagged_as_lower_bound_walls():
    rows = aggregate([_line("l1-flops0.5-s0", "l1", 88.0, resumed=True), _line("l1-flops0.5-s1", "l1", 89.0)])
    assert rows[0]["note"] == "1 resumed: wall is a lower bound"


def test_val_top1_is_shown_beside_the_test_when_the_runs_held_a_split_out(tmp_path):
    held = [dict(r, val_top1=r["top1"] - 1) if r.get("top1") is not None else r for r in LINES]
    rows = {(r["method"], r["budget"], r["target"]): r for r in aggregate(held)}
    assert rows[("l1", "equal epochs", "flops 0.5")]["val_top1"] == "87.50 ± 0.71"
    assert rows[("dense base", "", "-")]["val_top1"] == "89.00"
    assert "val_top1" not in rows[("x", "equal epochs", "flops 0.5")]  # failed: nothing to show
    mixed = [dict(held[1]), LINES[2]]  # one seed without a split: no mean over part of the seeds
    assert "val_top1" not in aggregate(mixed)[0]
    cfg = _cfg(tmp_path)
    cfg.results.write_text("".join(json.dumps(r) + "\n" for r in held))
    md = write_report(cfg, latency=False).markdown
    assert "| test top-1 % | vs base | val top-1 % | FLOPs kept |" in md
    assert "| 88.50 ± 0.71 (2) | -1.50 | 87.50 ± 0.71 |" in md
    cfg.results.write_text("".join(json.dumps(r) + "\n" for r in LINES))
    assert "val top-1" not in write_report(cfg, latency=False).markdown


def test_the_removal_step_scores_are_shown_beside_the_val_top1(tmp_path):
    held = [dict(r, val_top1=r["top1"] - 1, pruned_val_top1=r["top1"] - 40, recalibrated_val_top1=r["top1"] - 9)
            if r.get("top1") is not None and r["method"] != "dense base" else r for r in LINES]
    rows = {(r["method"], r["budget"], r["target"]): r for r in aggregate(held)}
    assert rows[("l1", "equal epochs", "flops 0.5")]["pruned_val_top1"] == "48.50 ± 0.71"
    assert rows[("l1", "equal epochs", "flops 0.5")]["recalibrated_val_top1"] == "79.50 ± 0.71"
    cfg = _cfg(tmp_path)
    cfg.results.write_text("".join(json.dumps(r) + "\n" for r in held))
    md = write_report(cfg, latency=False).markdown
    assert "| val top-1 % | pruned val % | + BN recal. val % | FLOPs kept |" in md


def test_equal_wall_rows_are_paired_with_their_reference_by_seed(tmp_path):
    ref = [_line(f"x-flops0.5-s{s}", "x", 88.0 + s, seed=s, val_top1=89.0 + s) for s in (0, 1)]
    wall = [_line(f"l1-wall-x-flops0.5-s{s}", "l1", 88.5 + 2 * s, seed=s, budget="equal wall", epochs=9 + s,
                  val_top1=89.0 + s, reference={"run": f"x-flops0.5-s{s}", "method": "x", "wall_s": 10.0})
            for s in (1, 0)]
    orphan = _line("kd-wall-x-flops0.5-s2", "kd", 80.0, seed=2, budget="equal wall", reference={"run": "missing"})
    rows = paired([*ref, *wall, orphan])
    assert rows == [{"method": "l1", "budget": "equal wall", "target": "flops 0.5", "reference": "x", "seeds": "0/1",
                     "epochs": "9/10", "d_top1": "+1.00 ± 0.71", "d_val": "+0.00 ± 0.00"}]
    assert paired(ref) == []
