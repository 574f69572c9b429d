"""Ship a finished `kdprune train` run as a base that `kp.pretrained(NAME)` loads (sha256-checked).

    python scripts/ship_base.py runs/base-resnet20b resnet20b-fmnist \
        --command "kdprune train --config configs/resnet20b_fmnist.yaml --out runs/base-resnet20b --threads 1" \
        --notes "..."

Copies the run's model (model.safetensors + structure.json) and its metrics.jsonl (as
train_metrics.jsonl) into src/kdprune/models/bases/NAME/ and writes NAME's manifest entry: the
weights' sha256, the test top-1 (test_metrics.json when the run held out a validation split,
else the last epoch's val_top1, which is then the test split), epochs, the command, the commit
the run recorded, and the machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import torch

BASES = Path(__file__).resolve().parents[1] / "src" / "kdprune" / "models" / "bases"


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry(run: Path, name: str, command: str, notes: str, commit: str | None = None) -> dict:
    """The manifest entry of a finished run."""
    cfg = json.loads((run / "config.json").read_text())
    spec = json.loads((run / "model" / "structure.json").read_text())["model"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tested = run / "test_metrics.json"
    test = json.loads(tested.read_text())["test_top1"] if tested.is_file() else rows[-1]["val_top1"]
    out = {"dir": name, "model": spec["name"], "model_kwargs": spec["kwargs"], "data": cfg["run"]["data"],
           "weights_sha256": sha256(run / "model" / "model.safetensors"), "test_top1": round(test, 2),
           "epochs": len(rows), "command": command, "commit": commit or cfg.get("meta", {}).get("git_commit", ""),
           "machine": f"{os.cpu_count()} shared CPU cores ({platform.machine()}), "
                      f"torch {torch.__version__}, 1 thread, "
                      f"~{rows[-1].get('epoch_time_s', 0) / 60:.1f} min per epoch", "notes": notes}
    if cfg["run"].get("val_split"):
        out["val_split"] = cfg["run"]["val_split"]
        out["val_top1"] = round(rows[-1]["val_top1"], 2)
    return out


def main() -> None:
    """Copy the run's files and write its manifest entry."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("name")
    ap.add_argument("--command", required=True)
    ap.add_argument("--notes", default="")
    ap.add_argument("--commit", help="the commit the command reproduces from, when the run recorded a dirty tree")
    args = ap.parse_args()
    dest = BASES / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for src, dst in (("model/model.safetensors", "model.safetensors"), ("model/structure.json", "structure.json"),
                     ("metrics.jsonl", "train_metrics.jsonl")):
        shutil.copyfile(args.run / src, dest / dst)
    manifest_path = BASES / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[args.name] = entry(args.run, args.name, args.command, args.notes, args.commit)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest[args.name], indent=2))


if __name__ == "__main__":
    main()
