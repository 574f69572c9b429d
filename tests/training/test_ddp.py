"""Data-parallel training under torchrun (gloo, 2 CPU processes): ranks stay identical."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.dist
def test_two_rank_gloo_training_keeps_weights_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k].float(), w1[k].float()) or "running" in k or "num_batches" in k, k
    # metrics are all-reduced: every rank reports the same numbers
    assert (tmp_path / "metrics0.txt").read_text() == (tmp_path / "metrics1.txt").read_text()
    # only rank 0 writes the run directory, once
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
