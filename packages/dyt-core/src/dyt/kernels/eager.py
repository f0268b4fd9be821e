"""The eager backend: plain PyTorch ops, differentiated by autograd. Runs anywhere, every option."""

import torch
import torch.nn.functional as F

from . import compute_dtype

SQUASHES = ("tanh", "hardtanh", "sigmoid", "identity")
"""DyT's squashing function f in ``weight * f(alpha * x) + bias``: the paper's default and its
ablation (Zhu et al. 2025, section 6.1): ``tanh``; ``hardtanh``, clamp to [-1, 1]; ``sigmoid``, the
plain logistic 1 / (1 + e^-y), range (0, 1), not zero-centred (the paper's curve; the affine
weight and bias can re-centre it); ``identity``, no squashing (alpha * x: the paper's run diverged)."""

SQUASH_FUNCTIONS = {
    "tanh": torch.tanh,
    "hardtanh": F.hardtanh,  # autograd: slope 1 strictly inside (-1, 1), 0 at and beyond the corners
    "sigmoid": torch.sigmoid,
    "identity": lambda y: y,
}


def check_squash(name: str) -> str:
    if name not in SQUASHES:
        raise ValueError(f"unknown DyT squash {name!r}; choose one of {', '.join(SQUASHES)}")
    return name


def dyt_eager(
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    squash: str = "tanh",
) -> torch.Tensor:
    """``weight * f(alpha * x) + bias`` in float32 (or wider) math, returned in ``x.dtype``.

    ``alpha`` (one element, or per channel), ``weight`` and ``bias`` must already broadcast
    against ``x``; ``f`` is ``SQUASH_FUNCTIONS[squash]``.
    """
    ct = compute_dtype(x, weight)
    y = weight.to(ct) * SQUASH_FUNCTIONS[squash](alpha.to(ct) * x.to(ct))
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
