"""`kdprune compress --target-latency F [--latency-batch N] [--latency-backend NAME] [--widths NAME]`:
the flags come from the recipe dataclasses (the backend an Enum field, widths a typed choice)."""
from __future__ import annotations

import pytest

from kdprune.cli.compress_cmd import build_recipe
from kdprune.cli.main import build_parser
from kdprune.engine import FreeWidths, MeasuredWidths, RoundTo
from kdprune.metrics import Backend
from kdprune.recipes import OED, L1Finetune


def _recipe(*argv: str):
    return build_recipe(build_parser().parse_args(["compress", "--from", "x", "--out", "y", *argv]))


def test_latency_target_flags():
    r = _recipe("--method", "l1", "--target-latency", "0.5", "--latency-batch", "64",
                "--latency-backend", "onnxruntime")
    assert isinstance(r, L1Finetune) and r.widths == FreeWidths()
    t = r.target()
    assert (t.metric, t.value, t.latency_batch, t.latency_backend) == ("latency", 0.5, 64, Backend.ONNXRUNTIME)
    assert _recipe("--method", "sdap", "--target-latency", "0.4").target().latency_backend is Backend.EAGER


def test_oed_takes_the_latency_flags_too():
    r = _recipe("--method", "oed", "--target-latency", "0.6", "--latency-backend", "TorchScript")
    assert isinstance(r, OED) and r.target().latency_backend is Backend.TORCHSCRIPT and r.target().value == 0.6


def test_width_policy_flag():
    assert _recipe("--method", "l1", "--target-flops", "0.5", "--widths", "measured").widths == MeasuredWidths()
    assert _recipe("--method", "kesi", "--target-flops", "0.5", "--widths", "round_to").widths == RoundTo(8)


def test_bad_latency_flags(capsys):
    with pytest.raises(SystemExit):
        _recipe("--method", "l1", "--target-latency", "0.5", "--latency-backend", "tensorrt")
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one"):
        _recipe("--method", "l1", "--target-latency", "0.5", "--target-flops", "0.5")
    with pytest.raises(ValueError, match="latency_batch"):
        _recipe("--method", "l1", "--target-latency", "0.5", "--latency-batch", "0")
