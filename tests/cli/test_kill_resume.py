"""kill -9 at random points of every recipe (in every stage), then `--resume`: the final model is
byte-identical to an uninterrupted run's (real subprocesses on a Fashion-MNIST subset)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_commands import needs_data

TINY = ["--train-subset", "192", "--val-subset", "32", "--batch-size", "32", "--max-steps-per-epoch", "2",
        "--no-latency", "--no-progress", "--threads", "1"]
RECIPES = {
    "l1": ["--target-flops", "0.5", "--epochs", "2"],
    "kd": ["--target-flops", "0.5", "--epochs", "2"],
    "groupnorm": ["--target-flops", "0.5", "--sparse-epochs", "2", "--epochs", "2"],
    "sdap": ["--target-params", "0.5", "--epochs", "2", "--ramp-epochs", "1"],
    "kesi": ["--target-flops", "0.6", "--rounds", "2", "--retrain-epochs", "2", "--distill-epochs", "2"],
    "pfec": ["--target-flops", "0.6", "--rounds", "2", "--retrain-epochs", "2"],
}
FAST = ("l1", "kesi")  # the rest run with the slow tests (`make test-all`)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    import torch

    import kdprune as kp

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("kill") / "base"
    kp.save_pruned(kp.create_model("resnet20", num_classes=10, in_chans=1), out)
    return out


def _cmd(method: str, src: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "kdprune.cli.main", "compress", "--method", method, "--from", str(src),
            *RECIPES[method], *TINY, "--out", str(out), *(["--resume"] if resume else [])]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _stages_in_order(run: Path) -> list[str]:
    ckpts = sorted(run.glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    return [p.parent.name for p in ckpts]


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 300) -> bool:
    """SIGKILL `proc` `delay` s after `ready()` holds; False if it finished first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise TimeoutError("the run never reached the kill point")
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@needs_data
@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in FAST else pytest.mark.slow) for m in RECIPES])
def test_kill_9_in_every_stage_then_resume_is_byte_identical(method, source, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(method, source, ref, False), env=_env(), check=True, capture_output=True, timeout=600)
    stages = _stages_in_order(ref)
    assert stages, "the reference run left no stage checkpoints"
    rng = random.Random(f"{method}-kill")
    run, kills, resume = tmp_path / "run", 0, False
    points = [lambda: True] + [lambda s=s: (run / s / "checkpoint.pt").is_file() for s in stages]
    for i, ready in enumerate(points):  # first: anywhere early (loading, pruning); then inside each stage
        proc = subprocess.Popen(_cmd(method, source, run, resume), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        delay = rng.uniform(0.5, 3.0) if i == 0 else rng.uniform(0.0, 0.4)
        kills += _kill_when(proc, ready, delay)
        if proc.poll() is None or proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(proc.stderr.read().decode()[-2000:])
        resume = True
    final = subprocess.run(_cmd(method, source, run, True), env=_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= len(stages), f"only {kills} kills landed for {len(stages)} stages"
    a = (ref / "model" / "model.safetensors").read_bytes()
    b = (run / "model" / "model.safetensors").read_bytes()
    assert a == b
