"""Helpers shared by the benchmark scripts (public API only): result files with provenance."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from kdprune.metrics import format_markdown
from kdprune.utils.meta import run_metadata, write_json

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, rows: list[dict[str, Any]], columns: dict[str, str], extra: dict | None = None) -> Path:
    """Write results/<name>.json (rows + command + metadata) and results/<name>.md (table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python " + " ".join(sys.argv), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "meta": run_metadata(), **(extra or {}), "rows": rows}
    write_json(RESULTS / f"{name}.json", payload)
    md = [f"# {name}", "", f"Command: `{payload['command']}`  ", f"Commit: `{payload['meta']['git_commit']}`, "
          f"torch {payload['meta']['torch']}, {payload['meta']['cpu_count']} CPU cores", "",
          format_markdown(rows, columns), ""]
    for k, v in (extra or {}).items():
        md.append(f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    return RESULTS / f"{name}.md"
