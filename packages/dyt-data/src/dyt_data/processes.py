"""How many worker processes a data step (datasets' ``map(num_proc=...)``) gets."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus() -> int:
    """CPUs this process may use: its affinity (a batch scheduler's cpuset), and a container's CPU
    quota (docker ``--cpus``, a Kubernetes limit: the cgroup's CPU quota), not the node's count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period that this process's cgroup allows, None for no limit: cgroup v2's
    ``cpu.max``, else v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (-1: no limit), which hosts
    still on v1 (and docker on them) set. Both as a container sees its own group, at the root."""
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            limit = int((folder / "cpu.cfs_quota_us").read_text())
            return None if limit < 0 else limit / int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError, ZeroDivisionError):
            continue
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
