"""A newcomer's failures (issue "Hardening from a newcomer's run"), one test per item: seeds,
overwrites, stage sizing, YAML merge and types, thread policy, README, help, one-line errors,
stage labels, file modes, hints."""
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kdprune.cli.compress_cmd import build_recipe
from kdprune.cli.main import build_parser, main
from kdprune.cli.recipe_flags import methods
from kdprune.training.config import Adam, OneCycle

from .test_commands import needs_data

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--train-subset", "256", "--val-subset", "64", "--batch-size", "64", "--no-progress"]


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--model", "resnet20", *SMALL, "--epochs", "1", "--max-steps-per-epoch", "1",
                 "--out", str(out), *extra])


def _compress(src: Path, out: Path, *extra: str) -> int:
    return main(["compress", "--method", "l1", "--from", str(src), "--target-flops", "0.5", *SMALL,
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--no-latency", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    if needs_data.args[0]:  # the skipif condition: data missing
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("hardening") / "base"
    assert _train(out) == 0
    return out


def _weights(run: Path) -> bytes:
    return (run / "model" / "model.safetensors").read_bytes()


# 1 ------------------------------------------------------------------------------------------
@needs_data
def test_seed_alone_fixes_the_run(tmp_path):
    import torch

    torch.manual_seed(1)  # whatever the process did before must not matter
    assert _train(tmp_path / "a", "--seed", "1") == 0
    torch.manual_seed(2)
    assert _train(tmp_path / "b", "--seed", "1") == 0
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")


# 2 ------------------------------------------------------------------------------------------
@needs_data
def test_out_is_never_overwritten_silently(base, tmp_path, capsys):
    before = _weights(base)
    assert _compress(base, base) == 2
    assert "would overwrite the --from model" in capsys.readouterr().err
    assert _weights(base) == before
    comp = tmp_path / "l1"
    assert _compress(base, comp) == 0
    assert _train(comp) == 2  # a compress run is not a training run
    assert "already holds a compress run" in capsys.readouterr().err and (comp / "report.json").is_file()
    assert _train(comp, "--overwrite") == 0
    assert not (comp / "report.json").exists()  # no stale report claiming the old result
    metrics = (comp / "metrics.jsonl").read_text()
    assert _train(comp) == 2  # a finished training run is not restarted without --resume
    assert "pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert (comp / "metrics.jsonl").read_text() == metrics
    assert _compress(base, comp, "--resume") == 2
    assert "holds a train run, not a compress run" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert _train(tmp_path / "mine", "--overwrite") == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_out_that_is_a_file_or_a_failed_start_is_a_clear_answer(base, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    assert _compress(base, tmp_path / "file") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"
    failed = tmp_path / "failed"  # an error after the marker was written (here: an unknown data set)
    assert _compress(base, failed, "--data", "no-such-set") == 2
    capsys.readouterr()
    assert _compress(base, failed) == 0  # the corrected command is not refused


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is present")
def test_device_cuda_without_a_gpu_fails_before_anything_is_loaded(base, tmp_path, capsys):
    assert _compress(base, tmp_path / "c", "--device", "cuda") == 2
    assert _train(tmp_path / "t", "--device", "cuda:0") == 2
    err = capsys.readouterr().err
    assert err.count("sees no CUDA GPU") == 2 and len(err.strip().splitlines()) == 2
    assert not (tmp_path / "c").exists() and not (tmp_path / "t").exists()


# 3 ------------------------------------------------------------------------------------------
def _recipe(argv: list[str]):
    return build_recipe(build_parser().parse_args(["compress", "--from", "x", "--out", "y", *argv]))


def test_every_stage_is_sized_from_the_cli():
    r = _recipe(["--method", "kesi", "--target-flops", "0.5", "--rounds", "2", "--retrain-epochs", "1",
                 "--distill-epochs", "1", "--distill-lr", "3e-4", "--max-steps-per-epoch", "3", "--seed", "4"])
    assert (r.rounds, r.retrain_config().epochs, r.distill_config().epochs) == (2, 1, 1)
    assert r.distill_config().optimizer.lr == 3e-4
    for stage in (r.finetune, r.distill):
        assert stage.max_steps_per_epoch == 3 and stage.seed == 4
    g = _recipe(["--method", "groupnorm", "--target-flops", "0.5", "--sparse-epochs", "1", "--sparse-lr", "0.02",
                 "--max-steps-per-epoch", "2", "--no-progress"])
    sparse = g.sparse
    assert (sparse.epochs, sparse.optimizer.lr, sparse.max_steps_per_epoch, sparse.progress) == (1, 0.02, 2, False)
    s = _recipe(["--method", "sdap", "--target-params", "0.25", "--ramp-epochs", "1.5", "--gate-l1", "1e-4"])
    assert (s.ramp_epochs, s.gate_l1) == (1.5, 1e-4)
    with pytest.raises(ValueError, match="--sparse-epochs does not apply to method 'l1'"):
        _recipe(["--method", "l1", "--target-flops", "0.5", "--sparse-epochs", "1"])


# 4 ------------------------------------------------------------------------------------------
def test_partial_yaml_merges_over_the_recipes_own_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: l1\nrecipe: {target_flops: 0.5, finetune: {epochs: 2}}\n")
    r = _recipe(["--config", str(cfg)])
    assert r.finetune.epochs == 2 and r.finetune.optimizer.lr == 0.01  # the recipe's lr, not TrainConfig's 0.1
    assert r.finetune == _recipe(["--method", "l1", "--target-flops", "0.5", "--epochs", "2"]).finetune
    cfg.write_text("method: kesi\nrecipe: {target_flops: 0.5, distill: {epochs: 1}}\n")
    d = _recipe(["--config", str(cfg)]).distill
    assert d.epochs == 1 and isinstance(d.optimizer, Adam) and isinstance(d.schedule, OneCycle)
    cfg.write_text("method: kesi\nrecipe: {target_flops: 0.5, distill: {optimizer: {lr: 5.0e-4}}}\n")
    assert _recipe(["--config", str(cfg)]).distill.optimizer == Adam(lr=5e-4)
    cfg.write_text("method: kesi\nrecipe: {target_flops: 0.5, distill: {optimizer: {type: sgd}}}\n")
    assert type(_recipe(["--config", str(cfg)]).distill.optimizer).__name__ == "SGD"  # another type: its defaults


# 5 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line,path,expect", [
    ("epochs: ten", "train.epochs", "an integer"),
    ("optimizer: {type: sgd, lr: fast}", "train.optimizer.lr", "a number"),
    ('augment: "no"', "train.augment", "true or false"),
    ("batch_size: 12.5", "train.batch_size", "an integer"),
])
def test_yaml_values_are_type_checked(tmp_path, capsys, line, path, expect):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"train:\n  {line}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: expected {expect}" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing written


# 6 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given,expect", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_import_sets_the_passive_wait_policy_unless_set(given, expect):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, kdprune; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expect


# 7 ------------------------------------------------------------------------------------------
def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    lines = [ln.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for ln in block.splitlines()]
    return [shlex.split(ln) for ln in lines if ln]


def test_readme_commands_run_as_written_after_the_setup():
    cmds = _readme_commands()
    assert cmds[0] == ["make", "demo"] and cmds[1] == ["make", "test"]
    first_kdprune = next(i for i, c in enumerate(cmds) if c[0] == "kdprune")
    assert ["source", ".venv/bin/activate"] in cmds[:first_kdprune]  # kdprune is on PATH
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    exists = {"runs/demo/kd50", "pretrained:resnet20-fmnist"}
    assert "kd50" in demo and "pretrained:resnet20-fmnist" in demo  # what the demo reads and writes
    parser = build_parser()
    for c in cmds[first_kdprune:]:
        argv = c[1:] if c[0] == "kdprune" else c[c.index("kdprune.cli.main") + 1:] if "kdprune.cli.main" in c else None
        if argv is None or argv == ["--help"] or "--help" in argv:
            continue
        args = parser.parse_args(argv)
        for src in [getattr(args, "source", None), getattr(args, "path", None)]:
            if src and args.command in ("compress", "eval"):
                assert src in exists, f"{' '.join(c)}: {src} does not exist at that point"
        if getattr(args, "config", None):
            assert (ROOT / args.config).is_file(), args.config
        if getattr(args, "out", None):
            assert args.out not in exists or args.resume, f"{' '.join(c)}: --out {args.out} is taken"
            exists.add(args.out)


# 8 ------------------------------------------------------------------------------------------
def test_compress_help_states_each_methods_real_defaults():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["compress"]
    text = sub.format_help()
    assert "(default 15)" not in text and "(default: the method's" in text
    for name, cls in methods().items():
        ft = cls().finetune
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name + " "))
        assert f"finetune: {ft.epochs} ep" in line and f"lr {ft.optimizer.lr:g}" in line, line
    assert "--rounds INT" in text and "kesi=5" in text


# 9 ------------------------------------------------------------------------------------------
def _one_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


@needs_data
def test_user_errors_are_one_line_with_exit_code_2(base, tmp_path, capsys, monkeypatch):
    assert main(["info"]) == 2
    assert "give a saved model or run directory, --model NAME, or --list" in _one_line(capsys.readouterr().err)
    assert main(["train", "--model-kwargs", "shortcut", "--out", str(tmp_path / "k")]) == 2
    assert "--model-kwargs expects key=value" in _one_line(capsys.readouterr().err)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "not valid YAML at line" in _one_line(capsys.readouterr().err)
    run = tmp_path / "corrupt"
    assert _train(run) == 0
    assert main(["train", "--model", "resnet32", *SMALL, "--epochs", "1", "--max-steps-per-epoch", "1",
                 "--out", str(run), "--resume"]) == 2
    assert "does not fit this model/task" in _one_line(capsys.readouterr().err)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _train(run, "--resume") == 2
    assert "cannot read checkpoint" in _one_line(capsys.readouterr().err)

    import kdprune

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kdprune, "train", interrupted)
    assert _train(tmp_path / "ctrlc") == 130
    err = _one_line(capsys.readouterr().err)
    assert "interrupted" in err and "add --resume to continue" in err


# 10 -----------------------------------------------------------------------------------------
@needs_data
def test_stage_labels_file_modes_and_hints(base, tmp_path, capsys):
    out = tmp_path / "kesi"
    assert main(["compress", "--method", "kesi", "--from", str(base), "--target-flops", "0.7", "--rounds", "2",
                 "--retrain-epochs", "1", "--distill-epochs", "1", "--max-steps-per-epoch", "1",
                 "--train-subset", "256", "--val-subset", "64", "--batch-size", "64", "--no-latency",
                 "--out", str(out)]) == 0
    logs = capsys.readouterr()
    text = logs.out + logs.err
    for label in ("round 1/2: epoch 1/1", "round 2/2: epoch 1/1", "distill: epoch 1/1"):
        assert label in text, label
    mask = os.umask(0)
    os.umask(mask)
    for f in (out / "round1" / "checkpoint.pt", out / "report.json", out / "model" / "model.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "checkpoint.pt").write_bytes(b"")
    assert _compress(killed, tmp_path / "x") == 2
    assert f"kdprune train --out {killed} --resume" in capsys.readouterr().err


def test_readme_describes_the_demo_it_runs():
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    method = re.search(r"compress --method (\w+)", demo).group(1)
    intro = (ROOT / "README.md").read_text().split("## Python API")[0]
    assert f"--method {method}" in intro and "KD" in intro


def test_every_method_flag_says_what_it_does():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    group = next(g for g in sub.choices["compress"]._action_groups if g.title.startswith("method options"))
    bare = [a.option_strings[0] for a in group._group_actions if not a.help or a.help.startswith("(")]
    assert not bare, f"flags without a description (comment the recipe field): {bare}"
