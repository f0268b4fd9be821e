"""The one norm factory every recipe calls: a config value picks LayerNorm, RMSNorm, DyT (and its
ablations), none, or a normalization-free baseline (SkipInit, Fixup, sigmaReparam: no norm layers;
their residual-branch and weight changes live in :mod:`dyt.baselines`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .alpha import ROLES, alpha_init_for, positive_number
from .backends import BACKENDS, check_backend_name, why_not_variant
from .kernels.eager import SQUASHES
from .modules import ALPHA_SHAPES, DyT, as_normalized_shape

BASELINES = ("skipinit", "fixup", "sigma-reparam")
"""Normalization-free baselines: every norm layer is removed (a :class:`NoNorm`) and
:mod:`dyt.baselines` changes the residual branches (SkipInit, Fixup) or the linear layers (sigmaReparam)."""
KINDS = ("layernorm", "rmsnorm", "dyt", "identity", *BASELINES)


@dataclass
class NormConfig:
    """How a model normalises. A recipe's ``model.norm`` is one of these.

    In YAML or on the command line a bare kind (``norm: dyt``, ``--set model.norm=dyt``) sets
    ``kind`` and leaves the rest at the recipe's defaults for ``model.norm`` (these class defaults
    where the recipe sets none).
    """

    SHORTHAND: ClassVar[str] = "kind"

    kind: str = "layernorm"
    """layernorm | rmsnorm | dyt | identity (identity: the paper's no-norm ablation) | skipinit |
    fixup | sigma-reparam (normalization-free baselines, :mod:`dyt.baselines`)."""
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
    squash: str = "tanh"
    """DyT only: tanh | hardtanh | sigmoid | identity, the paper's squashing-function ablation
    (``dyt.kernels.eager.SQUASHES``; the fused and cpu backends run tanh only)."""
    learnable_alpha: bool = True
    """DyT only: false keeps alpha fixed at alpha0 (not trained; still in the state dict and the
    ``alpha/`` metrics)."""
    alpha_shape: str = "scalar"
    """DyT only: scalar (the paper's one alpha per layer) | channel (one alpha per channel)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown norm kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.squash not in SQUASHES:
            raise ValueError(f"unknown squash {self.squash!r}; choose one of {', '.join(SQUASHES)}")
        if self.alpha_shape not in ALPHA_SHAPES:
            raise ValueError(f"unknown alpha_shape {self.alpha_shape!r}; choose one of {', '.join(ALPHA_SHAPES)}")
        for name in ("affine", "bias", "learnable_alpha"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if not isinstance(self.alpha_init, Mapping):
            raise ValueError(f"alpha_init must map roles to alpha0 values (e.g. {{ffn: 0.5}}), not {self.alpha_init!r}")
        if self.backend is not None:  # one spelling stored (and saved in a run's config.yaml)
            self.backend = check_backend_name(self.backend)
        if not positive_number(self.eps):
            raise ValueError(f"eps must be a positive number, not {self.eps!r}")
        for role, alpha in self.alpha_init.items():
            if not positive_number(alpha):
                raise ValueError(f"alpha_init.{role} must be a positive number (alpha0), not {alpha!r}")
        # plain floats stored (numpy's scalars accepted above): a run's config.yaml is written from these
        self.eps = float(self.eps)
        self.alpha_init = {role: float(alpha) for role, alpha in self.alpha_init.items()}
        if self.kind == "dyt" and self.backend in BACKENDS:  # e.g. fused with hardtanh: refused at load
            reason = why_not_variant(self.backend, self.squash, self.alpha_shape == "channel")
            if reason is not None:
                raise ValueError(reason)
        if self.alpha_policy not in ("default", "llm"):
            raise ValueError(f"unknown alpha_policy {self.alpha_policy!r}; choose default or llm")
        unknown = set(self.alpha_init) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) in alpha_init: {sorted(unknown)}; roles are {', '.join(ROLES)}")

    @property
    def layer_kind(self) -> str:
        """What each norm position holds: ``identity`` for the normalization-free baselines."""
        return "identity" if self.kind in BASELINES else self.kind

    READ_BY_KIND: ClassVar[dict[str, frozenset[str]]] = {
        "dyt": frozenset({"alpha_policy", "alpha_init", "bias", "backend", "squash", "learnable_alpha", "alpha_shape"}),
        "layernorm": frozenset({"eps", "affine", "bias"}),
        "rmsnorm": frozenset({"eps", "affine"}),
        "identity": frozenset(),
    }
    """The fields :func:`make_norm` builds each layer kind from (the normalization-free baselines
    hold ``identity`` layers and read the kind alone)."""

    def reads(self, name: str) -> bool:
        """Whether the layers this config builds depend on field ``name`` (``kind`` always)."""
        return name == "kind" or name in self.READ_BY_KIND[self.layer_kind]

    def check_roles(self, roles: Sequence[str], model: str) -> None:
        """Refuse an ``alpha_init`` key for a role ``model`` has no norm of (``roles``: those it
        builds): it would change nothing, so a sweep over it would train one model several times.
        ``default`` covers every role without its own key and is always accepted."""
        unused = [role for role in self.alpha_init if role != "default" and role not in roles]
        if unused:
            raise ValueError(f"norm.alpha_init.{unused[0]}: {model} has no norm of role {unused[0]!r} (its roles: "
                             f"{', '.join(roles)}; alpha_init.default sets every role without a key of its own)")

    def alpha_for(self, width: int, role: str) -> float:
        """alpha0 for one DyT: an explicit override, else the policy."""
        if role in self.alpha_init:
            return float(self.alpha_init[role])
        if "default" in self.alpha_init:
            return float(self.alpha_init["default"])
        return alpha_init_for(width, role if self.alpha_policy == "llm" else "default")


class NoNorm(nn.Identity):
    """A removed norm layer (kind ``identity`` and the baselines): returns its input. It remembers the
    shape, layout, device and dtype of the norm it stands for, so :func:`dyt.iter_norms` still lists
    the position and :func:`dyt.convert_norms` can put a norm back."""

    def __init__(self, normalized_shape: int | Sequence[int], channels_last: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.channels_last = channels_last
        self.register_buffer("placement", torch.empty(0, device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}" + ("" if self.channels_last else ", channels_last=False")


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
    if not isinstance(config, NormConfig):
        raise TypeError(f"make_norm takes a NormConfig or a norm kind, not {config!r}")
    shape = as_normalized_shape(dim)
    if not channels_last and len(shape) != 1:  # as DyT, ChannelsFirst and convert_norms take them
        raise ValueError(f"a channels-first norm layer takes one channel count, not {dim!r}")
    dim = shape[0] if len(shape) == 1 else shape  # plain ints: a numpy or 0-d tensor count too
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    factory = {"device": device, "dtype": dtype}
    if config.layer_kind == "identity":
        return NoNorm(dim, channels_last, **factory)
    if config.kind == "dyt":
        return DyT(
            dim,
            alpha_init=config.alpha_for(shape[-1], role),
            bias=config.bias,
            channels_last=channels_last,
            backend=config.backend,
            squash=config.squash,
            learnable_alpha=config.learnable_alpha,
            alpha_shape=config.alpha_shape,
            **factory,
        )
    if config.kind == "layernorm":
        norm: nn.Module = nn.LayerNorm(
            dim, eps=config.eps, elementwise_affine=config.affine, bias=config.bias and config.affine, **factory
        )
    else:
        norm = nn.RMSNorm(dim, eps=config.eps, elementwise_affine=config.affine, **factory)
    return norm if channels_last else ChannelsFirst(norm)


VARIANTS: dict[str, dict[str, str]] = {
    **{kind: {"kind": kind} for kind in ("layernorm", "rmsnorm", "identity", *BASELINES)},
    "dyt": {"kind": "dyt", "squash": "tanh", "learnable_alpha": "true", "alpha_shape": "scalar"},
}
"""Named norm variants for comparisons: ``dyt`` sets every DyT option (so a variant never inherits
another's); qualifiers after ``dyt:`` change one each (see :func:`norm_variant_overrides`)."""
DYT_QUALIFIERS: dict[str, tuple[str, str]] = {
    **{squash: ("squash", squash) for squash in SQUASHES},
    "fixed-alpha": ("learnable_alpha", "false"),
    "channel-alpha": ("alpha_shape", "channel"),
}


def norm_variant_overrides(variant: str, prefix: str = "model.norm") -> list[str]:
    """``--set`` items for one named norm variant, e.g. ``dyt:hardtanh`` ->
    ``["model.norm.kind=dyt", "model.norm.squash=hardtanh", ...]``.

    Names: layernorm, rmsnorm, identity (no norm), skipinit, fixup, sigma-reparam, dyt, and dyt with
    ``:``-separated qualifiers: a squash (tanh, hardtanh, sigmoid, identity), ``fixed-alpha``,
    ``channel-alpha`` (``dyt:sigmoid:fixed-alpha`` is sigmoid without a learnable alpha). A name
    that is none of these raises :class:`dyt.errors.UserInputError`.
    """
    from .errors import UserInputError

    base, *qualifiers = variant.split(":")
    if base not in VARIANTS or (qualifiers and base != "dyt"):
        known = ", ".join([*VARIANTS, *(f"dyt:{q}" for q in DYT_QUALIFIERS)])
        raise UserInputError(f"unknown norm variant {variant!r}; known: {known} (qualifiers combine: dyt:sigmoid:fixed-alpha)")
    settings = dict(VARIANTS[base])
    seen: set[str] = set()
    for qualifier in qualifiers:
        if qualifier not in DYT_QUALIFIERS:
            raise UserInputError(f"unknown qualifier {qualifier!r} in norm variant {variant!r}; "
                                 f"choose from {', '.join(DYT_QUALIFIERS)}")
        key, value = DYT_QUALIFIERS[qualifier]
        if key in seen:
            raise UserInputError(f"norm variant {variant!r} sets {key} twice")
        seen.add(key)
        settings[key] = value
    return [f"{prefix}.{key}={value}" for key, value in settings.items()]
