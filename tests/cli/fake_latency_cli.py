"""`python -m tests.cli.fake_latency_cli ARGS`: the kdprune CLI under the deterministic fake latency
model (tests/engine/fake_latency.py), for subprocess tests of `--target-latency` (a real timing
differs between processes, so two runs could pick other widths). KDP_FAKE_LATENCY: the fake's
fields as JSON (another machine: '{"block": 8}'); KDPRUNE_CACHE: the latency table's disk cache."""
from __future__ import annotations

import json
import os
import sys

import pytest

from kdprune.cli.main import main
from kdprune.metrics import latency_table as lt
from tests.engine.fake_latency import FakeLatency

if __name__ == "__main__":
    fake = FakeLatency(**json.loads(os.environ.get("KDP_FAKE_LATENCY", "{}")))
    fake.install(pytest.MonkeyPatch(), os.environ[lt.CACHE_ENV])
    sys.exit(main(sys.argv[1:]))
