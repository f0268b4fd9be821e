"""Model settings shared by HyenaDNA and Caduceus: ``model.arch`` picks the architecture and
``model.norm`` the norm (through dyt-core's one factory)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

import torch
from torch import nn

from dyt import NormConfig
from dyt.train.config import AT_LEAST_ONE, Range

from .caduceus import Caduceus
from .hyena import HyenaDNA

MODELS: dict[str, type[nn.Module]] = {"hyena": HyenaDNA, "caduceus": Caduceus}
"""``model.arch`` -> the model class it builds."""
NORM_ROLES = {"hyena": ("attention", "ffn", "final"), "caduceus": ("default", "final")}
"""The DyT roles of each architecture's norms (``model.norm.alpha_init`` keys): HyenaDNA's mixer
norm is ``attention``; Caduceus' block norms are ``default``."""
NORMALIZING_KINDS = ("layernorm", "rmsnorm")
"""The norm kinds that normalise; ``embedding_scale: no-norm`` gives the scalar to every other kind."""


class EmbeddingScale(nn.Module):
    def __init__(self, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@dataclass
class HyenaOptions:
    ffn_mult: Annotated[int, AT_LEAST_ONE] = 4
    filter_order: Annotated[int, AT_LEAST_ONE] = 64
    """Width of the implicit filter MLP."""
    filter_features: Annotated[int, AT_LEAST_ONE] = 5
    """Positional features fed to the filter MLP: t plus (filter_features - 1) / 2 cosine/sine pairs."""
    short_kernel: Annotated[int, AT_LEAST_ONE] = 3
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0


@dataclass
class CaduceusOptions:
    state: Annotated[int, AT_LEAST_ONE] = 16
    expand: Annotated[int, AT_LEAST_ONE] = 2
    conv_kernel: Annotated[int, AT_LEAST_ONE] = 4
    rcps: bool = True
    """Reverse-complement parameter sharing (Caduceus-PS); off: plain BiMamba (Caduceus-Ph)."""


@dataclass
class DnaModelConfig:
    arch: str = "hyena"
    """hyena | caduceus"""
    dim: Annotated[int, AT_LEAST_ONE] = 256
    """Hidden channels (Caduceus with RCPS: two halves of dim / 2)."""
    layers: Annotated[int, AT_LEAST_ONE] = 4
    max_len: Annotated[int, Range(ge=2)] = 1024
    """Longest input in bases."""
    norm: NormConfig = field(default_factory=NormConfig)
    embedding_scale: bool | Literal["no-norm"] | None = "no-norm"
    """A learnable scalar after the embedding, initialised to sqrt(dim), as the paper's LLaMA DyT.
    ``no-norm`` (the default since 2026-12-06): on for every kind without a normalization layer
    (DyT, with 0.02-std embeddings, otherwise sees inputs so small that its features ignore the
    sequence; the normalization-free baselines get what DyT gets), off for LayerNorm and RMSNorm
    (where it changes nothing measurable); see docs/dna.md. ``null``: DyT only, the default before,
    kept so that runs saved with it still describe the models they built."""
    tied_embeddings: bool | None = True
    """The LM head reads the embedding's 0.02-std weight (HyenaDNA and Caduceus as published); false:
    a head of its own, N(0, output_init_std^2); None: untied for DyT only (the tiny Caduceus'
    recipe until 2026-12-06; it unties every norm's now). Untied, DyT's final norm no longer
    saturates in pretraining (docs/dna.md)."""
    output_init_std: Annotated[float, Range(gt=0)] | None = None
    """Untied head only; default 1/sqrt(width) (unit-norm rows, as dyt-llama's untied head)."""
    hyena: HyenaOptions = field(default_factory=HyenaOptions)
    caduceus: CaduceusOptions = field(default_factory=CaduceusOptions)

    def ties_embeddings(self) -> bool:
        """Whether the LM head is the embedding's weight, with None resolved by the norm."""
        return self.tied_embeddings if self.tied_embeddings is not None else self.norm.kind != "dyt"

    def untied_output(self, embedding: nn.Embedding) -> nn.Embedding | None:
        """The LM head's own weight, shaped as ``embedding``; None when the head is tied to it."""
        if self.ties_embeddings():
            return None
        head = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim)
        std = embedding.embedding_dim**-0.5 if self.output_init_std is None else self.output_init_std
        nn.init.normal_(head.weight, std=std)
        return head

    def scales_embedding(self) -> bool:
        """Whether the model has the learnable scalar after the embedding, ``no-norm`` and None
        resolved by the norm."""
        if self.embedding_scale == "no-norm":
            return self.norm.kind not in NORMALIZING_KINDS
        if self.embedding_scale is None:
            return self.norm.kind == "dyt"
        return self.embedding_scale

    def resolved_nulls(self) -> DnaModelConfig:
        """This config as resume and comparisons compare it (:func:`dyt.train.config.resume_changes`):
        each null (and ``no-norm``) the norm decides, decided, so a run saved with ``null`` equals one
        given the value it resolved to (a tied head has no init std of its own)."""
        tied = self.ties_embeddings()
        return replace(self, embedding_scale=self.scales_embedding(), tied_embeddings=tied,
                       output_init_std=None if tied else self.output_init_std)

    def embedding_scaler(self) -> nn.Module:
        """sqrt(dim) * x with a learnable scale when wanted, else the identity."""
        return EmbeddingScale(math.sqrt(self.dim)) if self.scales_embedding() else nn.Identity()

    def __post_init__(self) -> None:
        if self.arch not in MODELS:
            raise ValueError(f"unknown model.arch {self.arch!r}; choose one of {', '.join(MODELS)}")
        if self.tied_embeddings is True and self.output_init_std is not None:
            raise ValueError("model.output_init_std sets an untied head's init; set model.tied_embeddings: false too")
        self.norm.check_roles(NORM_ROLES[self.arch], f"model.arch={self.arch}")
        if self.arch == "caduceus" and self.caduceus.rcps and self.dim % 2:
            raise ValueError(f"Caduceus with RCPS needs an even model.dim (two halves); got {self.dim}")
