"""Layering: kdprune.engine never imports kdprune.distill/methods (nor the zoo or io); kdprune.io
imports the zoo only lazily inside load_pruned."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kdprune.engine

ENGINE = Path(kdprune.engine.__file__).parent
FORBIDDEN = ("kdprune.distill", "kdprune.methods", "kdprune.models", "kdprune.io")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_sources_do_not_import_upper_layers():
    for path in ENGINE.glob("*.py"):
        bad = [m for m in imported_modules(path) if m.startswith(FORBIDDEN)]
        assert not bad, f"{path.name} imports {bad}"


def test_importing_engine_and_io_pulls_no_upper_layer():
    code = ("import sys, kdprune.engine, kdprune.io; "
            "print([m for m in sys.modules if m.startswith(('kdprune.distill', 'kdprune.methods', "
            "'kdprune.models'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_pickle_based_loading_in_io():
    io_dir = ENGINE.parent / "io"
    for path in io_dir.glob("*.py"):
        text = path.read_text()
        assert "torch.load" not in text and "import pickle" not in text, path.name
