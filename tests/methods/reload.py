"""A helper the method tests share: every model a test saved reloads in a fresh interpreter with the
outputs this process recorded, bit for bit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_CODE = ("import sys, json, importlib, torch, kdprune as kp; torch.set_num_threads(1)\n"  # as the tests run
         "root, factory = sys.argv[1], getattr(importlib.import_module(sys.argv[2]), sys.argv[3])\n"
         "ref = torch.load(root + '/ref.pt', weights_only=True); bad = []\n"
         "for name, want in ref['out'].items():\n"
         "    m = kp.load_pruned(root + '/' + name + '/model', factory=factory).eval()\n"
         "    with torch.no_grad(): got = m(ref['x'])\n"
         "    bad += [] if torch.equal(got, want) else [name]\n"
         "print(json.dumps(bad))")


def reload_mismatches(root: Path, factory: str, timeout: float) -> list[str]:
    """Names under ``root`` (each ``root/NAME/model``, outputs in ``root/ref.pt``: {"x", "out"}) whose
    reload with ``factory`` ("module:function") differs from the recorded output; fails on a crash."""
    module, fn = factory.split(":")
    proc = subprocess.run([sys.executable, "-c", _CODE, str(root), module, fn], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
