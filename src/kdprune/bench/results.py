"""The bench's results file: one JSON line per finished run, appended as soon as it finishes, so
a grid accumulates across sessions (and machines) in one committed file."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["read_lines", "append_line", "provenance", "describe_machine", "group_key"]


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a results JSONL (empty when it does not exist yet); a torn last line (a
    process killed mid-write) is skipped, so the run it described simply runs again."""
    if not path.is_file():
        return []
    out = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            print(f"kdprune bench: {path}:{n} is not a JSON line (a killed write?); ignored", file=sys.stderr)
    return out


def append_line(path: Path, line: dict[str, Any]) -> None:
    """Append one run's line and flush it to disk at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def describe_machine(threads: int | None, device: str) -> str:
    """'2 CPU cores (x86_64), 1 torch thread, cpu' or '... cuda: NVIDIA H200'."""
    import torch

    n = threads or torch.get_num_threads()
    text = f"{os.cpu_count()} CPU cores ({platform.machine()}), {n} torch thread{'s' if n != 1 else ''}"
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{text}, {device}: {torch.cuda.get_device_name(torch.device(device))}"
    return f"{text}, {device}"


def provenance(machine: str, command: str) -> dict[str, Any]:
    """What every line carries: commit, machine, versions, the command, the date."""
    import torch
    import torch_pruning

    import kdprune
    from kdprune.utils.meta import git_commit

    return {"commit": git_commit(), "machine": machine, "command": command,
            "versions": {"kdprune": kdprune.__version__, "torch": torch.__version__,
                         "torch_pruning": torch_pruning.__version__, "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def group_key(line: dict[str, Any]) -> tuple:
    """(method label, budget, target metric, target value): the lines one table row averages."""
    return (line["method"], line.get("budget", ""), line.get("target_metric"), line.get("target_value"))
