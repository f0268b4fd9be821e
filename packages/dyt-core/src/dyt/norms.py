"""The one norm factory every recipe calls: a config value picks LayerNorm, RMSNorm, DyT or none."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .alpha import ROLES, alpha_init_for
from .modules import DyT

KINDS = ("layernorm", "rmsnorm", "dyt", "identity")


@dataclass
class NormConfig:
    """How a model normalises. A recipe's ``model.norm`` is one of these.

    In YAML or on the command line a bare kind (``norm: dyt``, ``--set model.norm=dyt``) sets
    ``kind`` and leaves the rest at the recipe's defaults for ``model.norm`` (these class defaults
    where the recipe sets none).
    """

    SHORTHAND: ClassVar[str] = "kind"

    kind: str = "layernorm"
    """layernorm | rmsnorm | dyt | identity (identity: the paper's no-norm ablation)."""
    eps: float = 1e-5
    """LayerNorm/RMSNorm epsilon."""
    affine: bool = True
    """Learnable per-channel weight (LayerNorm/RMSNorm; DyT always has one)."""
    bias: bool = True
    """Per-channel bias for LayerNorm and DyT (RMSNorm has none). The paper's LLaMA DyT has none."""
    alpha_policy: str = "default"
    """DyT alpha0: ``default`` (0.5 everywhere) or ``llm`` (the paper's table by width and role)."""
    alpha_init: dict[str, float] = field(default_factory=dict)
    """Per-role alpha0 overrides, e.g. ``{attention: 0.8, ffn: 0.2}``; key ``default`` covers every role
    without its own key."""
    backend: str | None = None
    """DyT backend (None: the process default)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown norm kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.alpha_policy not in ("default", "llm"):
            raise ValueError(f"unknown alpha_policy {self.alpha_policy!r}; choose default or llm")
        unknown = set(self.alpha_init) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) in alpha_init: {sorted(unknown)}; roles are {', '.join(ROLES)}")

    def alpha_for(self, width: int, role: str) -> float:
        """alpha0 for one DyT: an explicit override, else the policy."""
        if role in self.alpha_init:
            return float(self.alpha_init[role])
        if "default" in self.alpha_init:
            return float(self.alpha_init["default"])
        return alpha_init_for(width, role if self.alpha_policy == "llm" else "default")


class ChannelsFirst(nn.Module):
    """Applies a channels-last norm to ``(batch, channels, ...)`` input."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def make_norm(
    config: NormConfig | str,
    dim: int | Sequence[int],
    *,
    role: str = "default",
    channels_last: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the norm layer ``config`` asks for over ``dim`` channels (or a trailing shape, as
    ``nn.LayerNorm`` takes; channels-first layers take one channel count).

    ``role`` (attention / ffn / final / input / default) only matters for DyT's alpha0, chosen by the last
    dimension's width.
    """
    if isinstance(config, str):
        config = NormConfig(kind=config)
    factory = {"device": device, "dtype": dtype}
    if config.kind == "identity":
        return nn.Identity()
    if config.kind == "dyt":
        return DyT(
            dim,
            alpha_init=config.alpha_for(dim if isinstance(dim, int) else dim[-1], role),
            bias=config.bias,
            channels_last=channels_last,
            backend=config.backend,
            **factory,
        )
    if config.kind == "layernorm":
        norm: nn.Module = nn.LayerNorm(
            dim, eps=config.eps, elementwise_affine=config.affine, bias=config.bias and config.affine, **factory
        )
    else:
        norm = nn.RMSNorm(dim, eps=config.eps, elementwise_affine=config.affine, **factory)
    return norm if channels_last else ChannelsFirst(norm)
