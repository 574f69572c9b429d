"""The CLI end to end on a small real-data subset: train, resume, eval, info, errors."""
import json
from pathlib import Path

import pytest

from kdprune.cli.main import main

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST not installed")


@needs_data
def test_train_resume_eval_info(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet20", "--train-subset", "256", "--val-subset", "128",
            "--batch-size", "64", "--epochs", "1", "--max-steps-per-epoch", "2", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0  # already finished: resumes to the same end
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(["eval", str(out), "--val-subset", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 269_722 - 2 * 16 * 9 and report["n"] == 64  # in_chans=1: conv1 is 16x1x3x3
    assert main(["info", str(out)]) == 0
    assert "resnet20: params" in capsys.readouterr().out


def test_info_layer_table(capsys):
    assert main(["info", "--model", "resnet20", "--layers"]) == 0  # in_chans 1 by default
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "params 269" in text


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["info", "--model", "resnet21"]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["train", "--model", "resnet20", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err
    assert main(["eval", str(tmp_path)]) == 2
    assert "structure.json" in capsys.readouterr().err


@needs_data
def test_compress_then_eval(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--model", "resnet20", "--train-subset", "256", "--val-subset", "128",
                 "--batch-size", "64", "--epochs", "1", "--max-steps-per-epoch", "1", "--no-progress",
                 "--out", str(base)]) == 0
    out = tmp_path / "l1"
    assert main(["compress", "--method", "l1", "--from", str(base), "--target-flops", "0.5", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--batch-size", "64", "--train-subset", "256",
                 "--val-subset", "128", "--no-latency", "--no-progress", "--out", str(out)]) == 0
    assert "| after |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert abs(report["after"]["flops"] / report["before"]["flops"] - 0.5) <= 0.01
    assert main(["eval", str(out), "--val-subset", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == report["after"]["flops"]
    assert main(["compress", "--method", "l1", "--from", str(base), "--reg", "0.1", "--target-flops", "0.5",
                 "--out", str(out)]) == 2
    assert "--reg does not apply" in capsys.readouterr().err


def test_info_groups_reports_coverage(capsys):
    assert main(["info", "--model", "resnet20", "--groups"]) == 0
    text = capsys.readouterr().out
    assert "in the group of conv1" in text and "classifier output" in text  # the option-A stream
    assert "19 of 20 conv/linear layers can be narrowed" in text  # the index-placing shortcut


@needs_data
def test_compress_oed_from_the_shipped_base(tmp_path):
    out = tmp_path / "oed"
    assert main(["compress", "--method", "oed", "--from", "pretrained:resnet20-fmnist", "--replicas", "2",
                 "--lam", "0.5", "--target-params", "0.7", "--select-val", "64", "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--batch-size", "32", "--train-subset", "512", "--val-subset", "64",
                 "--no-latency", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["replicas"] == 2 and report["method"]["held_out"] == 64
    assert abs(report["after"]["params"] / report["before"]["params"] - 0.7) <= 0.01
