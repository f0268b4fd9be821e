"""HyenaDNA: pre-norm blocks of the Hyena operator (order 2) and an MLP, causal next-base LM.

The Hyena operator: one input projection into (x0, x1, v); a short causal depthwise conv; an
implicit long filter (an MLP with sine activations over positional features, times an exponential
decay window); an FFT long convolution in O(L log L); gating y = x0 * (h * (x1 * v)).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dyt import NormConfig, apply_norm_free, make_norm, residual_gate

from .tokenizer import PAD, VOCAB

if TYPE_CHECKING:  # annotations only: config.py imports this module for its table of models
    from .config import DnaModelConfig, HyenaOptions


class Sin(nn.Module):
    """sin(w * x) with a learnable per-feature frequency (the implicit filter's activation)."""

    def __init__(self, dim: int, w: float = 10.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """A long causal filter of any length, generated from positions so parameters do not grow with L."""

    def __init__(self, channels: int, max_len: int, cfg: HyenaOptions) -> None:
        super().__init__()
        bands = (cfg.filter_features - 1) // 2
        self.register_buffer("bands", torch.linspace(1e-4, bands - 1, bands), persistent=False)
        width = cfg.filter_order
        self.mlp = nn.Sequential(
            nn.Linear(1 + 2 * bands, width), Sin(width),
            nn.Linear(width, width), Sin(width),
            nn.Linear(width, channels, bias=False),
        )
        for parameter in self.mlp.parameters():  # HyenaDNA trains its filter without weight decay
            parameter._no_weight_decay = True
        # Decay rates spread so some channels see far and some near (|h| falls to ~1% at their range).
        fast, slow = math.log(1e-2) / 0.3, math.log(1e-2) / 1.5
        self.register_buffer("decay", torch.linspace(fast, slow, channels).abs(), persistent=False)
        self.max_len = max_len

    def forward(self, length: int) -> torch.Tensor:
        """(channels, length) filter taps."""
        t = torch.linspace(0, 1, self.max_len, device=self.decay.device)[:length, None]
        angle = 2 * math.pi * self.bands * torch.arange(length, device=t.device)[:, None] / self.max_len
        features = torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=-1)
        # features are float32 (from the buffers, which DeepSpeed's bf16 leaves alone): in the MLP's dtype
        taps = self.mlp(features.to(self.mlp[0].weight.dtype)) * torch.exp(-t * self.decay)
        return rearrange(taps, "l c -> c l")


def fft_long_conv(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u (b, c, l) with k (c, l) in O(L log L), plus skip * u."""
    length = u.shape[-1]
    n = 2 * length  # zero padding: no wrap-around from the future
    work = torch.promote_types(u.dtype, torch.float32)  # FFTs in half precision lose the filter
    y = torch.fft.irfft(torch.fft.rfft(u.to(work), n=n) * torch.fft.rfft(k.to(work), n=n), n=n)[..., :length]
    return (y + u * skip[:, None]).to(u.dtype)


class HyenaOperator(nn.Module):
    def __init__(self, d: int, max_len: int, cfg: HyenaOptions) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_conv = nn.Conv1d(3 * d, 3 * d, cfg.short_kernel, groups=3 * d, padding=cfg.short_kernel - 1)
        self.filter = ImplicitFilter(d, max_len, cfg)
        self.skip = nn.Parameter(torch.randn(d))
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        u = rearrange(self.in_proj(x), "b l c -> b c l")
        u = self.short_conv(u)[..., :length]  # left padding only: causal
        x0, x1, v = u.chunk(3, dim=1)
        y = x0 * fft_long_conv(x1 * v, self.filter(length), self.skip)
        return self.out_proj(self.dropout(rearrange(y, "b c l -> b l c")))


class HyenaBlock(nn.Module):
    def __init__(self, d: int, max_len: int, norm: NormConfig, cfg: HyenaOptions) -> None:
        super().__init__()
        self.mixer_norm = make_norm(norm, d, role="attention")
        self.mixer = HyenaOperator(d, max_len, cfg)
        # Fixup scales the long filter through its MLP's last layer (linear in it): scaling the hidden
        # layers would lower the frequencies their Sin activations give, changing the filter's shape
        self.mixer_gate = residual_gate(norm, self.mixer, self.mixer.out_proj,
                                        scaled=(self.mixer.in_proj, self.mixer.filter.mlp[-1]))
        self.ffn_norm = make_norm(norm, d, role="ffn")
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_mult * d, d),
        )
        self.ffn_gate = residual_gate(norm, self.ffn, self.ffn[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer_gate(self.mixer(self.mixer_norm(x)))
        return x + self.ffn_gate(self.ffn(self.ffn_norm(x)))


class HyenaDNA(nn.Module):
    """Causal DNA LM. ``features`` gives the final-norm hidden states for classification heads."""

    causal = True
    """Predicts each base from the ones before it: pretrained on the next base (``DnaPretrainTask.loss``)."""

    def __init__(self, cfg: DnaModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(len(VOCAB), cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.embed_scale = cfg.embedding_scaler()
        self.output = cfg.untied_output(self.embed)
        self.blocks = nn.ModuleList(HyenaBlock(cfg.dim, cfg.max_len, cfg.norm, cfg.hyena) for _ in range(cfg.layers))
        self.final_norm = make_norm(cfg.norm, cfg.dim, role="final")
        self.feature_dim = cfg.dim
        apply_norm_free(self, cfg.norm)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence of {tokens.shape[1]} bases is longer than the model's context ({self.cfg.max_len})")
        x = self.embed_scale(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.features(tokens), (self.embed if self.output is None else self.output).weight)  # tied unless the config unties it

    def pool(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean over the real (non-pad) positions."""
        keep = (tokens != PAD).unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)
