"""Every test runs torch on one intra-op thread (the Ray workers of e2e tests set their own)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: results that don't depend on the machine's core count, and no OpenMP
    threads spinning against other processes on a busy box (the overfit test ran 2x slower with
    2 threads on a loaded 2-core machine, burning 2.5x the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
