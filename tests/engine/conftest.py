"""One intra-op thread: the tiny convs here are slower with 2 threads on a shared 2-core box.
Module-scoped so it also covers module-scoped fixtures (autouse fixtures of a scope run first)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
