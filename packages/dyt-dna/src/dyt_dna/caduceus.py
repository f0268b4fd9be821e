"""Caduceus: BiMamba blocks with reverse-complement equivariance by parameter sharing (RCPS).

With RCPS the hidden state has 2 * half channels: the first half reads the sequence, the second
half its reverse complement, and RC acts on hidden states as a flip of both the sequence and the
channel axes. Every RCPS module commutes with that flip, so the model's logits for RC(x) are the
complement-permuted, flipped logits for x — checked by property tests, component by component.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dyt import NormConfig, apply_norm_free, make_norm, residual_gate

from .scan import scan
from .tokenizer import COMPLEMENT, PAD, VOCAB

if TYPE_CHECKING:  # annotations only: config.py imports this module for its table of models
    from .config import CaduceusOptions, DnaModelConfig

_real_lengths: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("real_lengths", default=None)
"""Per sequence, how many of its leading positions are real (the rest right-padding), while
:meth:`Caduceus.features` runs a batch of unequal lengths; None: every position is real."""


@contextlib.contextmanager
def real_lengths(tokens: torch.Tensor):
    """Within it, every flip of the sequence axis reverses each sequence's real positions only and
    leaves its padding at the end: the backward Mamba and the reverse-complement half then read a
    sequence from its own last base, not from the padding after it, so a sequence's features do not
    depend on the batch it is padded in."""
    lengths = (tokens != PAD).sum(1)
    token = _real_lengths.set(None if bool((lengths == tokens.shape[1]).all()) else lengths)
    try:
        yield
    finally:
        _real_lengths.reset(token)


def flip_sequence(h: torch.Tensor) -> torch.Tensor:
    """Reverse the sequence axis (dim 1) of (b, l, ...) ``h``: within each sequence's real positions
    inside :func:`real_lengths`, the whole axis otherwise."""
    lengths = _real_lengths.get()
    if lengths is None:
        return h.flip(1)
    positions = torch.arange(h.shape[1], device=h.device)
    lengths = lengths.to(h.device)[:, None]
    index = torch.where(positions < lengths, lengths - 1 - positions, positions)
    return h.gather(1, index.view(*index.shape, *([1] * (h.dim() - 2))).expand_as(h))


def rc_hidden(h: torch.Tensor) -> torch.Tensor:
    """Reverse complement of (b, l, c) hidden states: flip sequence and channels."""
    return flip_sequence(h).flip(-1)


class Mamba(nn.Module):
    """One direction of a Mamba mixer; ``in_proj``/``out_proj`` may be shared with another direction."""

    def __init__(self, dim: int, cfg: CaduceusOptions, in_proj: nn.Linear, out_proj: nn.Linear) -> None:
        super().__init__()
        inner = cfg.expand * dim
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj, self.out_proj = in_proj, out_proj
        self.conv = nn.Conv1d(inner, inner, cfg.conv_kernel, groups=inner, padding=cfg.conv_kernel - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * cfg.state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=False)
        # dt starts log-uniform in [1e-3, 1e-1]: softplus^-1 of it is the bias.
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, cfg.state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # as mamba_ssm: decay rates are not decayed
        self.state = cfg.state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        u, gate = rearrange(self.in_proj(x), "b l c -> b c l").chunk(2, dim=1)
        u = F.silu(self.conv(u)[..., :length])
        dt, B, C = self.x_proj(rearrange(u, "b c l -> b l c")).split([self.dt_rank, self.state, self.state], dim=-1)
        dt = rearrange(self.dt_proj(dt), "b l c -> b c l")
        B, C = (rearrange(t, "b l n -> b n l") for t in (B, C))
        y = scan(u, dt, self.dt_bias, -torch.exp(self.A_log), B, C, self.D) * F.silu(gate)
        return self.out_proj(rearrange(y, "b c l -> b l c"))


class BiMamba(nn.Module):
    """Mamba over the sequence plus Mamba over the flipped sequence, projections tied."""

    def __init__(self, dim: int, cfg: CaduceusOptions) -> None:
        super().__init__()
        in_proj = nn.Linear(dim, 2 * cfg.expand * dim, bias=False)
        out_proj = nn.Linear(cfg.expand * dim, dim, bias=False)
        self.forward_mamba = Mamba(dim, cfg, in_proj, out_proj)
        self.backward_mamba = Mamba(dim, cfg, in_proj, out_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_mamba(x) + flip_sequence(self.backward_mamba(flip_sequence(x)))


class RCPS(nn.Module):
    """Runs ``module`` on the forward half and, flipped, on the reverse-complement half."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        forward_half, rc_half = h.chunk(2, dim=-1)
        return torch.cat([self.module(forward_half), rc_hidden(self.module(rc_hidden(rc_half)))], dim=-1)


class RCPSEmbedding(nn.Module):
    def __init__(self, vocab_size: int, half: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, half)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.register_buffer("complement", COMPLEMENT.clone(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rc = self.embedding(flip_sequence(self.complement[tokens]))
        return torch.cat([self.embedding(tokens), rc_hidden(rc)], dim=-1)


class RCPSLMHead(nn.Module):
    """Logits from both halves with one (tied) weight; the RC half votes for complement bases."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding
        self.register_buffer("complement", COMPLEMENT.clone(), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        forward_half, rc_half = h.chunk(2, dim=-1)
        weight = self.embedding.weight
        return F.linear(forward_half, weight) + F.linear(rc_half.flip(-1), weight)[..., self.complement]


class Block(nn.Module):
    """Mamba-style block: residual += hidden, then mixer(norm(residual)). The add+norm pair — fused
    in mamba_ssm, where the paper's own DyT patch missed its RMSNorm — uses the factory's norm."""

    def __init__(self, width: int, norm: NormConfig, cfg: CaduceusOptions) -> None:
        super().__init__()
        norm_layer, mixer = make_norm(norm, width), BiMamba(width, cfg)
        self.norm, self.mixer = (RCPS(norm_layer), RCPS(mixer)) if cfg.rcps else (norm_layer, mixer)
        # A scalar gate (SkipInit / Fixup) commutes with the RC flip: RCPS equivariance holds.
        self.gate = residual_gate(norm, self.mixer, mixer.forward_mamba.out_proj)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else hidden + residual
        return self.gate(self.mixer(self.norm(residual))), residual


class Caduceus(nn.Module):
    """Bidirectional DNA LM for masked-base prediction; ``features`` for classification heads."""

    causal = False
    """Reads the whole sequence both ways: pretrained on masked bases (``DnaPretrainTask.loss``)."""

    def __init__(self, cfg: DnaModelConfig) -> None:
        super().__init__()
        self.cfg, rcps = cfg, cfg.caduceus.rcps
        width = cfg.dim // 2 if rcps else cfg.dim
        self.embed = RCPSEmbedding(len(VOCAB), width) if rcps else nn.Embedding(len(VOCAB), width)
        self.embed_scale = cfg.embedding_scaler()  # a scalar: commutes with the RC flip
        self.blocks = nn.ModuleList(Block(width, cfg.norm, cfg.caduceus) for _ in range(cfg.layers))
        final = make_norm(cfg.norm, width, role="final")
        self.final_norm = RCPS(final) if rcps else final
        self.output = cfg.untied_output(self.embed.embedding if rcps else self.embed)
        self.head = RCPSLMHead(self.embed.embedding if self.output is None else self.output) if rcps else None
        self.feature_dim = width
        apply_norm_free(self, cfg.norm)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence of {tokens.shape[1]} bases is longer than the model's context ({self.cfg.max_len})")
        with real_lengths(tokens):
            hidden, residual = self.embed_scale(self.embed(tokens)), None
            for block in self.blocks:
                hidden, residual = block(hidden, residual)
            return self.final_norm(hidden + residual)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.features(tokens)
        return self.head(hidden) if self.head is not None else F.linear(hidden, (self.embed if self.output is None else self.output).weight)

    def pool(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean over real positions; with RCPS the two halves are summed so the pooled features are
        the same for a sequence and its reverse complement."""
        keep = (tokens != PAD).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)
        if self.cfg.caduceus.rcps:
            forward_half, rc_half = pooled.chunk(2, dim=-1)
            pooled = forward_half + rc_half.flip(-1)
        return pooled
