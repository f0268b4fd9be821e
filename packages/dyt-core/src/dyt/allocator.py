"""glibc's malloc in this process: keep freed blocks of every size for the next training step.

glibc serves each block above its mmap threshold (128 KiB at start, raised as such blocks are
freed, to at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``. A CPU training step whose
tensors pass 32 MiB (logits, attention scores, wide convolution features) so faults in every page of
them again each step: ~11 ms per 32 MiB on the 2-core dev box, where the arithmetic on them takes
2-3 ms. Raising the mmap and trim thresholds keeps those blocks in the heap instead. Measured with
``scripts/bench_allocator.py`` (docs/performance.md): 0.53-0.87x the step time where tensors pass
32 MiB, +6-19% peak resident memory (a heap holds freed holes that an exact mmap would not); below
32 MiB glibc's trimming of the heap's top still costs faults (0.85-1.01x at the demo's sizes).
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BELOW = 2**31 - 1
"""Both thresholds, in bytes: mallopt takes an int, so 2 GiB; only blocks above it are still mapped
and unmapped one by one."""

ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
"""glibc's own variables for the same settings: a user who set one has chosen the allocator."""

_applied: dict[str, int] = {}


def chosen_in_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """The variable through which the environment already sets glibc's malloc, if any."""
    for name in ENVIRONMENT:
        if name in environ:
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def cannot_keep_freed_blocks() -> str | None:
    """Why :func:`keep_freed_blocks` would leave malloc as it is in this process, or None."""
    if platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    chosen = chosen_in_environment()
    if chosen:
        return f"{chosen} is set in the environment"
    if _applied:
        return "this process already keeps freed blocks"
    return None


def keep_freed_blocks() -> str:
    """Raise glibc's mmap and trim thresholds to :data:`KEEP_BELOW` in this process, unless
    :func:`cannot_keep_freed_blocks` says why not. Returns one line that says what was done, for the
    run's log."""
    reason = cannot_keep_freed_blocks()
    if reason:
        return f"allocator: {reason}, so malloc is left as it is"
    libc = ctypes.CDLL("libc.so.6")
    for name, param in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD), ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD)):
        if libc.mallopt(param, KEEP_BELOW) != 1:
            return f"allocator: glibc refused mallopt({name}), so malloc is left as it is"
        _applied[name] = KEEP_BELOW
    return (f"allocator: freed blocks below {KEEP_BELOW / 2**30:.0f} GiB stay in the heap for the next step "
            "(glibc's mmap and trim thresholds raised)")


def applied() -> dict[str, int]:
    """The mallopt settings :func:`keep_freed_blocks` made in this process (empty if none)."""
    return dict(_applied)
