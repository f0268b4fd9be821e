"""The eager backend: plain PyTorch ops, differentiated by autograd. Runs anywhere."""

import torch

from . import compute_dtype


def dyt_eager(
    x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``weight * tanh(alpha * x) + bias`` in float32 (or wider) math, returned in ``x.dtype``.

    ``weight``/``bias`` must already broadcast against ``x``.
    """
    ct = compute_dtype(x, weight)
    y = weight.to(ct) * torch.tanh(alpha.to(ct) * x.to(ct))
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
