"""How many worker processes a data step (datasets' ``map(num_proc=...)``) gets."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus() -> int:
    """CPUs this process may use: its affinity (a batch scheduler's cpuset), and a container's CPU
    quota (docker ``--cpus``, a Kubernetes limit: cgroup ``cpu.max``), not the node's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs' worth of time per period that cgroup v2 allows this process's group; None for no limit."""
    try:
        limit, period = path.read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def worker_processes(asked: int, setting: str) -> int:
    """``asked`` (the ``setting``'s value), at most :func:`usable_cpus`: each worker loads its own copy
    of what it maps with (a tokenizer, an audio decoder), so more workers than CPUs only add memory and
    switching, and the recipes' results are the same for any count. A cut is said in one line."""
    cpus = usable_cpus()
    if asked <= cpus:
        return asked
    print(f"{setting} {asked} is more than the {cpus} CPU(s) this process may use: {cpus} worker processes", flush=True)
    return cpus
