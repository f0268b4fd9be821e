"""Inference-time folding: move a DyT's per-channel affine into the Linear layers it feeds.

``Linear(weight * tanh(alpha x) + bias) = Linear'(tanh(alpha x))`` with ``W' = W diag(weight)`` and
``b' = b + W bias``, so at inference the norm position runs only ``tanh(alpha x)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .convert import _is_exact
from .kernels import compute_dtype
from .kernels.eager import SQUASH_FUNCTIONS, check_squash
from .modules import DyT, ResidualDyT


class ScaledTanh(nn.Module):
    """``tanh(alpha * x)`` (or the DyT's other ``squash``): what remains of a DyT once its affine is
    folded away."""

    def __init__(self, alpha: torch.Tensor, squash: str = "tanh") -> None:
        super().__init__()
        self.alpha = nn.Parameter(alpha.detach().clone(), requires_grad=False)
        self.squash = check_squash(squash)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = compute_dtype(x, self.alpha)  # float32 math for half-precision input, as DyT's own
        return SQUASH_FUNCTIONS[self.squash](self.alpha.to(ct) * x.to(ct)).to(x.dtype)


@torch.no_grad()
def fold_dyt(dyt: DyT, *linears: nn.Linear) -> tuple[ScaledTanh, list[nn.Linear]]:
    """Fold ``dyt``'s weight and bias into every Linear it feeds (e.g. q, k and v projections).

    Returns the ``ScaledTanh`` to put where the DyT was and new Linear layers (the originals are
    untouched). Folding is done in float64 and cast back, so it is exact to rounding.

    Precondition, which only the caller can see: every consumer of the DyT's output is among
    ``linears``. Anything else that reads it (a residual taken from the norm's output, an
    activation, a pooling) would get ``tanh(alpha x)`` without the weight and bias. Refused: a
    ``ResidualDyT`` (its residual sum is a second output, and one-output ``ScaledTanh`` cannot stand
    where it stood) and an ``nn.Linear`` subclass with a forward of its own (its output need not be
    ``x W^T + b``, which the folding assumes).
    """
    if isinstance(dyt, ResidualDyT):
        raise ValueError("fold_dyt cannot fold a ResidualDyT: it also returns the residual sum, which a one-output "
                         "ScaledTanh cannot give; fold a DyT after a separate residual add")
    if not isinstance(dyt, DyT):
        raise TypeError(f"fold_dyt folds a dyt.DyT, not {type(dyt).__name__}")
    if not dyt.channels_last or len(dyt.normalized_shape) != 1:
        raise ValueError("fold_dyt needs a channels-last DyT over one dimension")
    if not linears:
        raise ValueError("fold_dyt needs at least one nn.Linear that the DyT feeds")
    for linear in linears:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"fold_dyt folds into nn.Linear layers given one by one, not {type(linear).__name__}")
        if not _is_exact(linear, nn.Linear):
            raise ValueError(f"fold_dyt cannot fold into {type(linear).__name__}: it overrides nn.Linear.forward, so its "
                             "output need not be x W^T + b, which folding the DyT's weight and bias into W and b assumes")
    scale = dyt.weight.double()
    shift = None if dyt.bias is None else dyt.bias.double()
    folded = []
    for linear in linears:
        if linear.in_features != dyt.normalized_shape[0]:
            raise ValueError(f"{linear} does not take the DyT's {dyt.normalized_shape[0]} channels")
        w = linear.weight.double()
        new = nn.Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None or shift is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        new.weight.copy_(w * scale[None, :])
        if new.bias is not None:
            b = linear.bias.double() if linear.bias is not None else torch.zeros_like(w[:, 0])
            new.bias.copy_(b + (w @ shift if shift is not None else 0.0))
        folded.append(new)
    return ScaledTanh(dyt.alpha, dyt.squash), folded
