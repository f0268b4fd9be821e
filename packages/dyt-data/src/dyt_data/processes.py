"""How many worker processes a data step (datasets' ``map(num_proc=...)``) gets."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a batch scheduler's share of a node, not the node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_processes(asked: int, setting: str) -> int:
    """``asked`` (the ``setting``'s value), at most :func:`usable_cpus`: each worker loads its own copy
    of what it maps with (a tokenizer, an audio decoder), so more workers than CPUs only add memory and
    switching, and the recipes' results are the same for any count. A cut is said in one line."""
    cpus = usable_cpus()
    if asked <= cpus:
        return asked
    print(f"{setting} {asked} is more than the {cpus} CPU(s) this process may use: {cpus} worker processes", flush=True)
    return cpus
