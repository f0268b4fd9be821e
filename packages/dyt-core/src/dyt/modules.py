"""The DyT module: a drop-in replacement for one LayerNorm or RMSNorm."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

from .alpha import positive_number
from .backends import check_backend_name, default_backend, why_not_variant
from .functional import dyt, residual_dyt
from .kernels.eager import check_squash

ALPHA_SHAPES = ("scalar", "channel")


def as_normalized_shape(value: int | Sequence[int]) -> tuple[int, ...]:
    """A channel count, or a trailing shape as ``nn.LayerNorm`` takes it, as a tuple of positive
    ints; a ValueError naming it otherwise (0, negative, float, bool, empty)."""
    items = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    if not items or any(isinstance(d, bool) or not hasattr(d, "__index__") or operator.index(d) < 1 for d in items):
        raise ValueError(f"normalized_shape must be a positive channel count (or a shape of them), not {value!r}")
    return tuple(operator.index(d) for d in items)


class DyT(nn.Module):
    """Dynamic Tanh, ``weight * tanh(alpha * x) + bias`` (Zhu et al., 2025).

    Parameter names and shapes (``alpha`` [1], ``weight``, ``bias``) match the paper's reference
    ``DynamicTanh``, so its checkpoints load with ``load_state_dict``.

    Args:
        normalized_shape: channel count (or trailing shape, as for ``nn.LayerNorm``).
        alpha_init: initial alpha (the paper's default 0.5; see :func:`dyt.alpha_init_for`).
        bias: ``False`` gives ``weight * tanh(alpha * x)``, the paper's LLaMA form.
        channels_last: ``False`` for ``(batch, channels, ...)`` inputs.
        backend: ``eager`` / ``compiled`` / ``fused`` / ``cpu`` / ``auto``; None follows the process default
            (``DYT_BACKEND`` or :func:`dyt.use_backend`), itself ``auto`` unless set.
        squash: ``tanh`` (DyT) or one of the paper's ablations, ``hardtanh`` / ``sigmoid`` /
            ``identity`` (see :data:`dyt.kernels.eager.SQUASHES`).
        learnable_alpha: ``False`` keeps alpha at ``alpha_init``: a buffer (still in the state dict,
            never in the optimizer), the paper's "without alpha" ablation when alpha_init is 1.
        alpha_shape: ``scalar`` (the paper's one alpha) or ``channel`` (one alpha per channel,
            shaped like ``weight``).
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        alpha_init: float = 0.5,
        bias: bool = True,
        channels_last: bool = True,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        squash: str = "tanh",
        learnable_alpha: bool = True,
        alpha_shape: str = "scalar",
    ) -> None:
        super().__init__()
        shape = as_normalized_shape(normalized_shape)
        if not positive_number(alpha_init):
            raise ValueError(f"alpha_init must be a positive number (alpha0), not {alpha_init!r}")
        for name, flag in (("bias", bias), ("channels_last", channels_last), ("learnable_alpha", learnable_alpha)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, not {flag!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"DyT's parameters need a floating-point dtype, not {dtype}")
        if not channels_last and len(shape) != 1:
            raise ValueError(f"channels-first DyT takes one channel count, got {shape}")
        if alpha_shape not in ALPHA_SHAPES:
            raise ValueError(f"unknown alpha_shape {alpha_shape!r}; choose one of {', '.join(ALPHA_SHAPES)}")
        self.normalized_shape = shape
        self.alpha_init = float(alpha_init)
        self.channels_last = channels_last
        self.backend = None if backend is None else check_backend_name(backend)
        if backend is None:
            default_backend()  # a mistyped DYT_BACKEND is named where the model is built, not at its first forward
        self.squash = check_squash(squash)
        self.learnable_alpha = learnable_alpha
        self.alpha_shape = alpha_shape
        if self.backend is not None and (reason := why_not_variant(self.backend, squash, alpha_shape == "channel")):
            raise ValueError(reason)
        factory = {"device": device, "dtype": dtype}
        alpha = torch.empty(shape if alpha_shape == "channel" else 1, **factory)
        if learnable_alpha:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(shape, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dyt(
            x, self.alpha, self.weight, self.bias, channels_last=self.channels_last, backend=self.backend,
            squash=self.squash,
        )

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, alpha_init={self.alpha_init}, bias={self.bias is not None}"
        if self.squash != "tanh":
            text += f", squash={self.squash!r}"
        if not self.learnable_alpha:
            text += ", learnable_alpha=False"
        if self.alpha_shape != "scalar":
            text += f", alpha_shape={self.alpha_shape!r}"
        if not self.channels_last:
            text += ", channels_last=False"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text


class ResidualDyT(DyT):
    """DyT that also does the residual add before it: ``forward(x, residual) -> (s, DyT(s))`` with
    ``s = x + residual``, the two steps of a pre-norm block. With the fused or cpu backend both happen
    in one kernel each way. Same parameters (and state-dict names) as :class:`DyT`."""

    def __init__(self, normalized_shape: int | Sequence[int], alpha_init: float = 0.5, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None, **options) -> None:
        super().__init__(normalized_shape, alpha_init, bias, True, backend, device, dtype, **options)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return residual_dyt(x, residual, self.alpha, self.weight, self.bias, backend=self.backend, squash=self.squash)
