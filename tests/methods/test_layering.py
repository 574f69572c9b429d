"""Imports point down: the methods layer never loads the CLI."""
import subprocess
import sys


def test_methods_do_not_import_cli():
    code = ("import sys, kdprune.methods, kdprune.recipes; "
            "print(sorted(m for m in sys.modules if m.startswith('kdprune.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
