"""Kernel layer: DyT forward/backward implementations, one module per backend.

Every kernel takes the canonical layout prepared by :mod:`dyt.functional`:
``x`` is 2-D ``(rows, channels)`` with ``weight``/``bias`` of shape ``(channels,)``, or 3-D
``(batch, channels, length)`` with ``weight``/``bias`` of shape ``(channels, 1)``; ``reduce_dims``
names the dimensions a parameter gradient sums over. Kernels know nothing of modules or recipes.
Math runs in float32 (or float64 when inputs are float64); outputs keep the input's dtype.
"""

import torch


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype DyT math runs in: at least float32, float64 if either operand is float64."""
    return torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
