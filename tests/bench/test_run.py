"""`run_bench` end to end on a tiny grid: lines appended per finished run, equal-wall and control
runs, the saved models; a killed bench resumes without re-running (or re-training) finished runs."""
import json

import pytest
import torch

import kdprune as kp
from kdprune.bench import read_lines, run_bench
from kdprune.bench import run as bench_run

from .helpers import tiny_config, tiny_data


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny grid with the dense control and equal wall time (tpm as the reference), run once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    cfg = tiny_config(root, equal_wall={"reference": "tpm", "methods": ["l1"]})
    new = run_bench(cfg, data=tiny_data(), command="pytest bench")
    return cfg, new


def test_every_run_appends_one_line(finished):
    cfg, new = finished
    lines = read_lines(cfg.results)
    assert lines == new  # everything was new, and appended as it finished
    tags = [r["run"] for r in lines]
    assert tags == ["dense-base", "l1-flops0.5-s0", "tpm-flops0.5-s0", "control-e1-s0", "l1-wall-tpm-flops0.5-s0",
                    "l1-flops0.5-s1", "tpm-flops0.5-s1", "control-e1-s1", "l1-wall-tpm-flops0.5-s1"]
    base = lines[0]
    assert base["input_shape"] == [1, 8, 8] and (base["train_images"], base["val_images"]) == (64, 16)
    assert 0 <= base["val_top1"] <= 100
    for r in lines:
        assert {"commit", "machine", "command", "versions", "date"} <= set(r) and r["command"] == "pytest bench"
        assert r["versions"]["torch_pruning"] == "1.6.0"


def test_method_lines(finished):
    cfg, _ = finished
    runs = [r for r in read_lines(cfg.results) if r["budget"] == "equal epochs" and r["recipe"] != "dense"]
    assert {(r["method"], r["recipe"], r["seed"]) for r in runs} == {
        ("l1", "L1Finetune", 0), ("l1", "L1Finetune", 1), ("tpm", "TPMagnitude", 0), ("tpm", "TPMagnitude", 1)}
    base_top1 = read_lines(cfg.results)[0]["top1"]
    for r in runs:
        assert (r["target_metric"], r["target_value"]) == ("flops", 0.5) and abs(r["flops_kept"] - 0.5) <= 0.01
        assert r["epochs"] == 1 and r["base_top1"] == base_top1 and not r["resumed"]
        assert 0 <= r["top1"] <= 100 and "val_top1" in r  # test reported, val held out of the training images
        assert 0 <= r["pruned_val_top1"] <= 100 and 0 <= r["recalibrated_val_top1"] <= 100  # the removal step
        assert r["config"]["finetune"]["seed"] == r["seed"] and r["config"]["finetune"]["threads"] == 1
        assert r["train_flops"] > 0  # counted training compute (issue 36): the basis of equal-compute rows
        model = kp.load_pruned(cfg.runs / r["run"] / "model")
        assert kp.complexity(model, input_size=(1, 1, 8, 8)).flops == pytest.approx(
            r["flops_kept"] * read_lines(cfg.results)[0]["flops"], rel=1e-3)


def test_control_and_equal_wall_lines(finished):
    cfg, _ = finished
    lines = {r["run"]: r for r in read_lines(cfg.results)}
    for s in (0, 1):
        ctl, wall = lines[f"control-e1-s{s}"], lines[f"l1-wall-tpm-flops0.5-s{s}"]
        assert ctl["method"] == "dense + same epochs" and ctl["epochs"] == 1 and ctl["flops_kept"] == 1.0
        assert 0 <= ctl["val_top1"] <= 100  # the held-out split, as every compress run reports it
        assert wall["budget"] == "equal wall" and wall["reference"]["run"] == f"tpm-flops0.5-s{s}"
        own = lines[f"l1-flops0.5-s{s}"]
        per_epoch = own["wall_s"] / own["epochs"]
        assert wall["epochs"] == max(1, int(wall["reference"]["wall_s"] // per_epoch))
        assert wall["config"]["finetune"]["epochs"] == wall["epochs"]


def test_killed_bench_resumes_without_rerunning(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, methods=[{"label": "l1", "method": "l1"}])
    calls = []
    real_compress, real_append = bench_run.compress, bench_run.append_line

    def counting(model, recipe, *a, **kw):
        calls.append(kw["out_dir"].name)
        return real_compress(model, recipe, *a, **kw)

    def die_after_first_run(path, line):
        real_append(path, line)
        if line["run"] == "l1-flops0.5-s0":
            raise KeyboardInterrupt("killed after the first finished run")

    monkeypatch.setattr(bench_run, "compress", counting)
    monkeypatch.setattr(bench_run, "append_line", die_after_first_run)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, data=tiny_data(), only=["l1"])
    first = (cfg.results).read_text()
    assert [r["run"] for r in read_lines(cfg.results)] == ["dense-base", "l1-flops0.5-s0"]
    monkeypatch.setattr(bench_run, "append_line", real_append)
    calls.clear()
    new = run_bench(cfg, data=tiny_data(), only=["l1"])
    assert calls == ["l1-flops0.5-s1"]  # the finished run was not compressed (or trained) again
    assert [r["run"] for r in new] == ["l1-flops0.5-s1"]
    assert cfg.results.read_text().startswith(first)  # earlier lines untouched
    assert [r["run"] for r in read_lines(cfg.results)] == ["dense-base", "l1-flops0.5-s0", "l1-flops0.5-s1"]


def test_run_finished_but_unrecorded_is_reused(tmp_path, monkeypatch):
    """Killed after compress finished, before its line was written: the saved report is reused."""
    cfg = tiny_config(tmp_path, methods=[{"label": "l1", "method": "l1"}], seeds=[0])
    real_append = bench_run.append_line

    def die_before_writing(path, line):
        if line["run"].startswith("l1"):
            raise KeyboardInterrupt("killed before the line")
        real_append(path, line)

    monkeypatch.setattr(bench_run, "append_line", die_before_writing)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, data=tiny_data(), only=["l1"])
    report = json.loads((cfg.runs / "l1-flops0.5-s0" / "report.json").read_text())
    monkeypatch.setattr(bench_run, "append_line", real_append)
    monkeypatch.setattr(bench_run, "compress", lambda *a, **k: pytest.fail("re-ran a finished run"))
    (line,) = run_bench(cfg, data=tiny_data(), only=["l1"])
    assert line["resumed"] and line["wall_s"] == round(report["wall_time_s"], 1)


def test_only_and_changed_recipe(tmp_path):
    cfg = tiny_config(tmp_path, seeds=[0])
    with pytest.raises(ValueError, match="choose from control, l1, tpm"):
        run_bench(cfg, data=tiny_data(), only=["nope"])
    new = run_bench(cfg, data=tiny_data(), only=["tpm"])
    assert [r["run"] for r in new] == ["dense-base", "tpm-flops0.5-s0"]
    lines = cfg.results.read_text().splitlines()
    cfg.results.write_text("\n".join(lines[:1]) + "\n")  # forget the run, keep its folder
    changed = tiny_config(tmp_path, seeds=[0], methods=[
        {"label": "tpm", "method": "tp-magnitude", "recipe": {"finetune": {"optimizer": {"lr": 0.5}}}}])
    with pytest.raises(ValueError, match="another recipe"):
        run_bench(changed, data=tiny_data(), only=["tpm"])


def test_report_times_the_saved_models(finished):
    from kdprune.bench import write_report

    cfg, _ = finished
    rep = write_report(cfg)
    assert rep.table == cfg.results.with_suffix(".md") and rep.table.read_text() == rep.markdown
    assert [p.name for p in rep.plots] == ["tiny_pareto_flops.png", "tiny_pareto_latency.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in rep.plots)
    stored = json.loads(cfg.results.with_suffix(".latency.json").read_text())["groups"]
    assert set(stored) == {"dense base", "l1 | equal epochs | flops 0.5", "tpm | equal epochs | flops 0.5",
                           "l1 | equal wall | flops 0.5"}
    rows = {(r["method"], r["budget"]): r for r in rep.rows}
    assert rows[("dense base", "")]["speedup_bs4"] == 1.0 and rows[("tpm", "equal epochs")]["lat_bs4_ms"] > 0
    assert "CPU ms bs4" in rep.markdown and "± " in rep.markdown


def test_the_validation_split_is_the_one_every_command_holds_out(tmp_path):
    cfg = tiny_config(tmp_path)
    full, test = tiny_data()
    data = bench_run.prepare_data(cfg, (full, test))
    rest, held = full.split(16, seed=kp.data.SPLIT_SEED)  # what train/compress --val-split 16 hold out
    assert torch.equal(data.val.images, held.images) and data.test is test
    seen = {tuple(x.flatten().tolist()) for x in data.train.images}
    assert len(data.train) == 64 and not seen & {tuple(x.flatten().tolist()) for x in held.images}


def test_equal_wall_only_at_its_targets(tmp_path):
    from kdprune.bench.run import EQUAL_EPOCHS, wall_runs

    cfg = tiny_config(tmp_path, targets=[{"flops": 0.5}, {"flops": 0.25}],
                      equal_wall={"reference": "tpm", "methods": ["l1"], "targets": [{"flops": 0.25}]})
    lines = [{"method": m, "budget": EQUAL_EPOCHS, "target_metric": "flops", "target_value": v, "seed": 0,
              "epochs": 1, "wall_s": w, "run": f"{m}-{v}"}
             for m, w in (("l1", 10.0), ("tpm", 35.0)) for v in (0.5, 0.25)]
    runs = wall_runs(cfg, lines, 0)
    assert [(r.target.value, r.recipe.finetune.epochs) for r in runs] == [(0.25, 3)]
    with pytest.raises(ValueError, match="is not a target of"):
        tiny_config(tmp_path, equal_wall={"reference": "tpm", "methods": ["l1"], "targets": [{"flops": 0.3}]})


def test_equal_compute_gives_the_baseline_the_references_counted_flops(tmp_path):
    """Issue 36: epochs = the reference's counted train_flops over the baseline's own per epoch (never
    fewer than at equal epochs), not its wall time; lines without a count give no run."""
    from kdprune.bench.run import EQUAL_COMPUTE, EQUAL_EPOCHS, compute_runs

    cfg = tiny_config(tmp_path, equal_compute=[{"reference": "tpm", "methods": ["l1"]}])
    lines = [{"method": m, "budget": EQUAL_EPOCHS, "target_metric": "flops", "target_value": 0.5, "seed": 0,
              "epochs": 1, "wall_s": w, "train_flops": f, "run": m}
             for m, w, f in (("l1", 10.0, 2e9), ("tpm", 1.0, 7.5e9))]  # fast in seconds, costly in FLOPs
    (run,) = compute_runs(cfg, lines, 0)
    assert run.recipe.finetune.epochs == 3 and run.budget == EQUAL_COMPUTE and run.reference["train_flops"] == 7.5e9
    assert run.tag == "l1-compute-tpm-flops0.5-s0"
    assert compute_runs(cfg, [{k: v for k, v in r.items() if k != "train_flops"} for r in lines], 0) == []
    with pytest.raises(ValueError, match="no method labelled"):
        tiny_config(tmp_path, equal_compute={"reference": "nope", "methods": ["l1"]})


def test_a_resumed_run_counts_the_epochs_of_the_killed_process(tmp_path):
    from kdprune.bench.run import _earlier_seconds

    out = tmp_path / "run"
    for stage, times in (("sparse", [10.0, 12.0]), ("finetune", [5.5])):
        (out / stage).mkdir(parents=True)
        (out / stage / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i + 1, "epoch_time_s": t}) + "\n"
                                                           for i, t in enumerate(times)))
    assert _earlier_seconds(out) == 27.5
    (out / "report.json").write_text("{}")  # a report without the saved model: the run is not reused
    assert _earlier_seconds(out) == 27.5
    (out / "model").mkdir()
    (out / "model" / "structure.json").write_text("{}")  # finished before its line: reused, its report has it all
    assert _earlier_seconds(out) == 0.0
    assert _earlier_seconds(tmp_path / "fresh") == 0.0


def test_a_resumed_control_counts_the_epochs_of_the_killed_process(tmp_path, monkeypatch):
    """The dense control resumes from its checkpoint and adds the killed process's epoch seconds,
    as a resumed compress run does."""
    from kdprune.training import loop

    cfg = tiny_config(tmp_path, seeds=[0], budget={"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 2,
                                                   "threads": 1})
    real_write = loop._write_epoch

    def write_then_die(*args, **kw):
        real_write(*args, **kw)
        raise KeyboardInterrupt("killed after the first epoch")

    monkeypatch.setattr(loop, "_write_epoch", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, data=tiny_data(), only=["control"])
    rows = [json.loads(s) for s in (cfg.runs / "control-e2-s0" / "metrics.jsonl").read_text().splitlines()]
    monkeypatch.setattr(loop, "_write_epoch", real_write)
    (line,) = [r for r in run_bench(cfg, data=tiny_data(), only=["control"]) if r["run"] == "control-e2-s0"]
    assert line["resumed"] and line["epochs"] == 2
    assert line["wall_earlier_s"] == round(rows[0]["epoch_time_s"], 1) and line["wall_s"] >= line["wall_earlier_s"]


def test_seeds_runs_only_those_of_the_config(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=r"--seeds \[7\]: not seeds of tiny; choose from \[0, 1\]"):
        run_bench(cfg, data=tiny_data(), only=["tpm"], seeds=[7])
    new = run_bench(cfg, data=tiny_data(), only=["tpm"], seeds=[1])
    assert [r["run"] for r in new] == ["dense-base", "tpm-flops0.5-s1"]


def test_equal_wall_runs_can_wait_for_a_later_call(tmp_path):
    cfg = tiny_config(tmp_path, seeds=[0], equal_wall={"reference": "tpm", "methods": ["l1"]})
    first = run_bench(cfg, data=tiny_data(), equal_wall=False)
    assert [r["run"] for r in first] == ["dense-base", "l1-flops0.5-s0", "tpm-flops0.5-s0", "control-e1-s0"]
    assert [r["run"] for r in run_bench(cfg, data=tiny_data())] == ["l1-wall-tpm-flops0.5-s0"]
