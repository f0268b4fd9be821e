import os
from pathlib import Path

# Idle OpenMP threads sleep at once instead of spinning: two test workers, each with 2 threads, share
# 2 cores, and a spinning thread takes the core the other worker computes on (test_ablations.py beside
# test_fused.py: 59-60 s of CPU spinning, 33-37 s sleeping; docs/performance.md). libgomp reads it
# when torch loads it, so before torch is imported; workers and the commands tests start inherit it.
# tests/test_cpu_fused.py runs the kernels under both settings in processes of their own.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Without a GPU, Triton kernels run in Triton's interpreter. Triton reads this when its language
# module and our kernels are first imported, so it is set before anything imports triton.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402
import torch  # noqa: E402

from dyt.selfcheck import reference as dyt_reference  # noqa: E402  (float64: the ground truth)

# Tests run on CPU in a few threads; keep compile caches per test session.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def reference():
    return dyt_reference


@pytest.fixture
def fresh_mapping_faults():
    """Page faults of filling a fresh anonymous mapping of ``nbytes``: one per page, or one per huge
    page where the kernel gives transparent huge pages to every mapping."""
    try:
        always = "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        always = False
    page = 2 * 2**20 if always else os.sysconf("SC_PAGE_SIZE")
    return lambda nbytes: nbytes // page
