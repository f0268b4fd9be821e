"""LLaMA: RoPE, grouped-query attention (SDPA), SwiGLU, pre-norm blocks, final norm.

Every norm comes from dyt-core's ``make_norm`` with its role (attention / ffn / final), so
``model.norm`` alone switches RMSNorm, LayerNorm or DyT everywhere (or a normalization-free baseline:
each residual branch passes through ``residual_gate`` and ``apply_norm_free`` finishes the build,
see dyt.baselines). A learnable scalar multiplies the embeddings (initialised to sqrt(dim)): the
paper gives it to its DyT LLaMA; here every norm has it by default (``embedding_scale``).
No parallelism or launcher logic lives here: the training harness wraps the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Annotated

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from dyt import NormConfig, apply_norm_free, make_norm, residual_gate
from dyt.train.config import AT_LEAST_ONE, POSITIVE, Range
from dyt.train.distributed import init_normal_

NORM_ROLES = ("attention", "ffn", "final")
"""The DyT roles of the norms :class:`Llama` builds (``model.norm.alpha_init`` keys)."""


@dataclass
class ModelConfig:
    """LLaMA architecture. ``norm`` picks every norm layer (rmsnorm, layernorm, dyt, identity) or a
    normalization-free baseline (skipinit, fixup, sigma-reparam)."""

    dim: Annotated[int, AT_LEAST_ONE] = 256
    layers: Annotated[int, AT_LEAST_ONE] = 4
    heads: Annotated[int, AT_LEAST_ONE] = 8
    kv_heads: Annotated[int, AT_LEAST_ONE] = 4
    ffn_dim: Annotated[int, AT_LEAST_ONE] = 688
    vocab_size: Annotated[int, Range(ge=2, le=2**32)] = 4096
    max_seq_len: Annotated[int, Range(ge=2)] = 256
    rope_theta: Annotated[float, POSITIVE] = 10000.0
    tied_embeddings: bool = False
    activation_checkpointing: bool = False
    init_std: Annotated[float, POSITIVE] = 0.02
    """Init std of embeddings and projections (residual output projections get it / sqrt(2 layers))."""
    output_init_std: Annotated[float, POSITIVE] | None = None
    """Init std of an untied output head; None: dim ** -0.5 (unit-norm rows, as in torchtitan's and
    the DyT paper's LLaMA code). Bounded DyT features need this: with a 0.02 head the tiny DyT model
    saturated every tanh to reach confident logits and stalled at the unigram loss
    (docs/performance.md). A tied head is the embedding and keeps ``init_std``."""
    norm: NormConfig = field(
        default_factory=lambda: NormConfig(kind="rmsnorm", eps=1e-5, bias=False, alpha_policy="llm")
    )
    """The recipe's norm defaults hold for every kind: ``--set model.norm=dyt`` alone is the paper's
    LLaMA DyT (no bias, alpha0 from its table by width and role)."""
    embedding_scale: bool | None = True
    """A learnable scalar after the embedding, initialised to sqrt(dim), for every norm: the paper adds
    it to its DyT LLaMA, and given to DyT alone, the scalar (not DyT) made the tiny DyT model's lead
    over RMSNorm (docs/llama.md). None: on exactly when the norm is DyT, the paper's two recipes (the default, and
    so what a run's config.yaml records, before 2026-12-05)."""

    def __post_init__(self) -> None:
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"dim ({self.dim}) must divide by heads ({self.heads}), heads by kv_heads ({self.kv_heads})"
            )
        if (self.dim // self.heads) % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.dim // self.heads}")
        self.norm.check_roles(NORM_ROLES, "LLaMA")

    def scales_embedding(self) -> bool:
        """Whether the model has the learnable scalar after the embedding, with None resolved by the norm."""
        return self.embedding_scale if self.embedding_scale is not None else self.norm.kind == "dyt"

    def resolved_nulls(self) -> ModelConfig:
        """This config as resume and comparisons compare it (:func:`dyt.train.config.resume_changes`): a
        DyT run saved with ``embedding_scale: null`` built the model today's default builds."""
        return replace(self, embedding_scale=self.scales_embedding())


def rope_tables(head_dim: int, length: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x: (batch, heads, seq, head_dim)."""
    pairs = rearrange(x.float(), "... (d two) -> ... d two", two=2)
    even, odd = pairs.unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)").type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads
        self.wq = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)
        self.wo._residual_output = True  # the residual branch's output: its init is scaled by depth (Llama._init_std)

    def forward(self, x, cos, sin):
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", h=self.heads)
        k = rearrange(self.wk(x), "b t (h d) -> b h t d", h=self.kv_heads)
        v = rearrange(self.wv(x), "b t (h d) -> b h t d", h=self.kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w2._residual_output = True  # the residual branch's output: its init is scaled by depth (Llama._init_std)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg.norm, cfg.dim, role="attention")
        self.attention = Attention(cfg)
        self.attention_gate = residual_gate(cfg.norm, self.attention, self.attention.wo)
        self.ffn_norm = make_norm(cfg.norm, cfg.dim, role="ffn")
        self.feed_forward = FeedForward(cfg)
        # SwiGLU: w2 (silu(w1 x) * w3 x) is a product of three weight layers (Fixup's m = 3)
        self.ffn_gate = residual_gate(cfg.norm, self.feed_forward, self.feed_forward.w2, depth=3)

    def forward(self, x, cos, sin):
        x = x + self.attention_gate(self.attention(self.attention_norm(x), cos, sin))
        return x + self.ffn_gate(self.feed_forward(self.ffn_norm(x)))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_scale = nn.Parameter(torch.tensor([math.sqrt(cfg.dim)])) if cfg.scales_embedding() else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = make_norm(cfg.norm, cfg.dim, role="final")
        self.output = None if cfg.tied_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        apply_norm_free(self, cfg.norm)

    def reset_parameters(self) -> None:
        """Matrices from a normal of :meth:`_init_std`. Through ``init_normal_``, so that under
        ZeRO-3's partitioned build (children already sharded) the weights are the same as a whole
        build's and no parameter is gathered whole."""
        for module in self.modules():  # the order of named_parameters(): the same draws
            for p in module.parameters(recurse=False):
                if len(getattr(p, "ds_shape", p.shape)) == 2:
                    init_normal_(p, std=self._init_std(module))

    def _init_std(self, module: nn.Module) -> float:
        """Embeddings and projections: init_std; a residual branch's output projection (marked
        ``_residual_output``) scaled by depth (GPT-2); an untied head: output_init_std (default 1/sqrt(dim))."""
        cfg = self.cfg
        if module is self.output:
            return cfg.dim**-0.5 if cfg.output_init_std is None else cfg.output_init_std
        if getattr(module, "_residual_output", False):
            return cfg.init_std / math.sqrt(2 * cfg.layers)
        return cfg.init_std

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) for tokens (batch, seq)."""
        length = tokens.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.output is None else self.output(x)


def count_parameters(model: nn.Module) -> int:
    """All parameters, also when ZeRO-3 has sharded them (``ds_numel``: the whole parameter's size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
