"""The CLI's --val-split (its own file: the slowest CLI test, scored on the full test set several times,
runs on its own pytest-xdist worker): training images held out for the run's choices, the test set
only reported."""
import json

from kdprune.cli.main import main

from .test_commands import needs_data


@needs_data
def test_val_split_holds_out_training_images_and_reports_on_test(tmp_path, capsys):
    import kdprune as kp

    train, test = kp.data.load("fashion-mnist")
    rest, held = train.split(1000, seed=kp.data.SPLIT_SEED)
    base = tmp_path / "base"
    assert main(["train", "--model", "resnet20", "--val-split", "1000", "--val-subset", "500", "--train-subset", "256",
                 "--batch-size", "64", "--epochs", "1", "--max-steps-per-epoch", "1", "--no-progress",
                 "--out", str(base)]) == 0
    scores = json.loads((base / "test_metrics.json").read_text())
    assert scores["images"] == len(test) and scores["val_split"] == 1000
    out = tmp_path / "l1"
    assert main(["compress", "--method", "l1", "--from", str(base), "--target-flops", "0.5", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--batch-size", "64", "--val-split", "1000", "--no-latency",
                 "--no-progress", "--control", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scored_on"] == "test" and report["before"]["top1"] == scores["test_top1"]
    assert "top-1 on the held-apart test set" in (out / "report.md").read_text()  # the reader is told which
    assert json.loads((out / "config.json").read_text())["run"]["val_split"] == 1000
    assert "| dense + 1 epoch(s) |" in capsys.readouterr().out
    # the held-out images are exactly those the training runs never drew from
    assert len(rest) + len(held) == len(train) and len(held) == 1000
