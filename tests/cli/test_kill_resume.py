"""kill -9 at random points of every registered method (in every stage), then `--resume`: the
final model is byte-identical to an uninterrupted run's (real subprocesses on a Fashion-MNIST
subset). The cases come from the method registry, so a new method is covered without editing
this file; a latency-target case runs under the deterministic fake latency model."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdprune.cli.recipe_flags import methods, recipe_fields

from .test_commands import needs_data

TINY = ["--train-subset", "192", "--val-subset", "32", "--batch-size", "32", "--max-steps-per-epoch", "2",
        "--no-latency", "--no-progress", "--threads", "1"]
# Only where the generic command (a target, --epochs 2, 2 epochs per declared stage) does not fit:
OVERRIDES = {
    "kesi": ["--rounds", "2"],  # 5 rounds (each a cut and a retrain) by default
    "pfec": ["--rounds", "2"],
    "sdap": ["--ramp-epochs", "1"],  # its default ramp (5) is longer than the 2 epochs
}
# OED's 0.5 of the FLOPs: whole blocks of this resnet20 keep 0.473 or 0.532, so blocks then channels (its
# trim stage killed and resumed too); its fake latency of 0.532 is within the latency target's 5% of 0.5
TARGETS: dict[tuple[str, str], str] = {}
FAST = ("l1", "kesi")  # the rest run with the slow tests (`make test-all`)
REPO = Path(__file__).resolve().parents[2]


def recipe_args(method: str, target: str = "target_flops") -> list[str]:
    """The tiny command of one method: a target of 0.5, 2 epochs, 2 epochs in each stage it
    declares, then its override (argparse keeps the last value of a repeated flag)."""
    scalars, stages = recipe_fields(methods()[method])
    target = target if target in scalars else "target_params"
    stage_flags = [a for s in stages for a in ("--" + s.replace("_", "-") + "-epochs", "2")]
    value = TARGETS.get((method, target), "0.5")
    return ["--" + target.replace("_", "-"), value, "--epochs", "2", *stage_flags, *OVERRIDES.get(method, [])]


CASES = {m: recipe_args(m) for m in methods()}
# --target-latency (every method that takes one): the searched cut is recorded and re-applied on
# resume (issue 34). Method -> whether the resumes after its first stage checkpoint run on a machine
# that times differently; elsewhere every process runs on the same (fake) machine and must re-derive
# the same cut: KESI cuts each round (a later round searched on another machine rightly picks other
# widths), SDAP / Cascade / EDP / OED search before or during training.
LATENCY = {m: m == "l1" for m, cls in methods().items() if "target_latency" in recipe_fields(cls)[0]}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    import torch

    import kdprune as kp

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("kill") / "base"
    kp.save_pruned(kp.create_model("resnet20", num_classes=10, in_chans=1), out)
    return out


def _cmd(method: str, args: list[str], src: Path, out: Path, resume: bool, fake: bool) -> list[str]:
    entry = "tests.cli.fake_latency_cli" if fake else "kdprune.cli.main"
    return [sys.executable, "-m", entry, "compress", "--method", method, "--from", str(src),
            *args, *TINY, "--out", str(out), *(["--resume"] if resume else [])]


def _env(cache: Path, other_machine: bool = False) -> dict[str, str]:
    # the other machine's fake latency grows nonlinearly (l1 searched there keeps 0.62 of the params, not
    # 0.48), with its own latency table
    fake = '{"power": 1.5}' if other_machine else "{}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KDP_FAKE_LATENCY": fake,
            "KDPRUNE_CACHE": str(cache / ("other" if other_machine else "same"))}


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


def _kill_in_every_stage(method, args, source, run, stages, cache, fake, move) -> int:
    """Start, SIGKILL and `--resume` the run: once early, then inside each of `stages`; the kills that landed."""
    rng = random.Random(f"{method}-{args}-kill")
    kills, resume = 0, False
    points = [lambda: True] + [lambda s=s: (run / s / "checkpoint.pt").is_file() for s in stages]
    for i, ready in enumerate(points):  # first: anywhere early (loading, pruning); then inside each stage
        # `move`: from the third process on (a stage checkpoint, and so the cut, exists) on another machine
        proc = subprocess.Popen(_cmd(method, args, source, run, resume, fake), env=_env(cache, move and i >= 2),
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        delay = rng.uniform(0.5, 3.0) if i == 0 else rng.uniform(0.0, 0.4)
        kills += _kill_when(proc, ready, delay)
        if proc.poll() is None or proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(proc.stderr.read().decode()[-2000:])
        resume = True
    return kills


def _kill_in_every_stage_then_resume(method, args, source, tmp_path, fake=False, move=False) -> None:
    ref, run, cache = tmp_path / "ref", tmp_path / "run", tmp_path / "latency-cache"
    subprocess.run(_cmd(method, args, source, ref, False, fake), env=_env(cache), cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    stages = _stages_in_order(ref)
    assert stages, "the reference run left no stage checkpoints"
    kills = _kill_in_every_stage(method, args, source, run, stages, cache, fake, move)
    final = subprocess.run(_cmd(method, args, source, run, True, fake), env=_env(cache, move),
                           cwd=REPO, check=False, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= len(stages), f"only {kills} kills landed for {len(stages)} stages"
    a = (ref / "model" / "model.safetensors").read_bytes()
    b = (run / "model" / "model.safetensors").read_bytes()
    assert a == b


def test_the_cases_are_the_method_registry():
    """A newly registered method gets a case (slow unless listed in FAST), and its generic command
    parses into its recipe with every declared stage short; an override names a real method."""
    from kdprune.cli.compress_cmd import build_recipe
    from kdprune.cli.main import build_parser

    assert set(CASES) == set(methods())
    assert set(OVERRIDES) | set(FAST) | set(LATENCY) | {m for m, _ in TARGETS} <= set(CASES), \
        "names no registered method"
    for method, args in CASES.items():
        ns = build_parser().parse_args(["compress", "--method", method, "--from", "x", "--out", "y", *args])
        recipe = build_recipe(ns)
        assert type(recipe) is methods()[method]
        for stage in ["finetune", *recipe_fields(type(recipe))[1]]:  # KESI's distill_epochs overrides its stage's
            epochs = getattr(recipe, f"{stage}_epochs", None) or getattr(recipe, stage).epochs
            assert epochs <= 2, (method, stage)


@needs_data
@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m in FAST else pytest.mark.slow) for m in CASES])
def test_kill_9_in_every_stage_then_resume_is_byte_identical(method, source, tmp_path):
    _kill_in_every_stage_then_resume(method, CASES[method], source, tmp_path)


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("method", list(LATENCY))
def test_kill_9_in_a_latency_target_run_then_resume_is_byte_identical(method, source, tmp_path):
    """Under the fake latency model: a real timing differs between processes, and with it the cut."""
    args = recipe_args(method, "target_latency")
    _kill_in_every_stage_then_resume(method, args, source, tmp_path, fake=True, move=LATENCY[method])
