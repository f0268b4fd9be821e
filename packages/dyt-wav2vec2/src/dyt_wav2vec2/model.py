"""wav2vec 2.0 built from fairseq2's parts, with every LayerNorm chosen by ``model.norm``.

The encoder's norms come through fairseq2's hook, ``Wav2Vec2EncoderFactory.create_layer_norm``,
which here calls dyt-core's factory. The frontend's norms (post-extraction, and the encoder-input
one of post-norm models) are built by fairseq2 directly, so they are swapped after building with
:func:`dyt.convert_norms`, which builds through the same factory. ``model.norm_scope`` says how far
the switch reaches: ``encoder`` (default, the paper's fairseq patch) leaves the conv feature
extractor's norms as in the baseline; ``all`` converts them too (an ablation). Nothing else differs
between the LayerNorm and the DyT model. The normalization-free baselines (``model.norm.kind``
skipinit / fixup / sigma-reparam, dyt.baselines) remove the same norms, put dyt-core's residual gate
into each encoder layer's two residual connections (fairseq2's ``ResidualConnect`` hook) and finish
with ``apply_norm_free``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from fairseq2.models.transformer import StandardTransformerEncoderLayer, TransformerNormOrder
from fairseq2.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2EncoderConfig, Wav2Vec2Model
from fairseq2.models.wav2vec2.factory import Wav2Vec2EncoderFactory, Wav2Vec2Factory
from fairseq2.nn import BatchLayout
from fairseq2.nn.residual import ResidualConnect
from torch import nn

from dyt import NormConfig, apply_norm_free, convert_norms, make_norm, residual_gate
from dyt.train.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, Range

NORM_ORDERS = {"pre": TransformerNormOrder.PRE, "post": TransformerNormOrder.POST}
NORM_SCOPES = ("encoder", "all")
FEATURE_EXTRACTOR = "encoder_frontend.feature_extractor"
POST_EXTRACT = "encoder_frontend.post_extract_layer_norm"
"""The norm over the conv features: DyT role ``input`` (``model.norm.alpha_init.input``)."""
NORM_ROLES = ("input", "default")
"""The DyT roles of the model's norms (:func:`role_of`): ``model.norm.alpha_init`` keys."""


@dataclass
class Wav2Vec2ModelConfig:
    """The wav2vec 2.0 sizes and settings a recipe chooses; everything else is fairseq2's default."""

    dim: Annotated[int, AT_LEAST_ONE] = 768
    layers: Annotated[int, AT_LEAST_ONE] = 12
    heads: Annotated[int, AT_LEAST_ONE] = 12
    ffn_dim: Annotated[int, AT_LEAST_ONE] = 3072
    conv_layers: list[list[int]] = field(
        default_factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2)
    """Feature extractor convs as [channels, kernel, stride]; the default is 320x downsampling (50 Hz)."""
    conv_layer_norm: bool = False
    """LayerNorm in every conv (large_lv60k) instead of fairseq2's GroupNorm in the first one."""
    norm_order: str = "post"
    """post (Base) | pre (Large, as the paper trained it)."""
    pos_conv_kernel: Annotated[int, AT_LEAST_ONE] = 128
    pos_conv_groups: Annotated[int, AT_LEAST_ONE] = 16
    final_dim: Annotated[int, AT_LEAST_ONE] = 256
    quantized_dim: Annotated[int, AT_LEAST_ONE] = 256
    codebooks: Annotated[int, AT_LEAST_ONE] = 2
    codebook_entries: Annotated[int, AT_LEAST_ONE] = 320
    distractors: Annotated[int, AT_LEAST_ONE] = 100
    codebook_temperature: tuple[Annotated[float, POSITIVE], Annotated[float, POSITIVE],
                                Annotated[float, Range(gt=0, le=1)]] = (2.0, 0.5, 0.999995)
    """Gumbel-softmax temperature: start, floor, decay per update (Base; Large floors at 0.1)."""
    mask_prob: Annotated[float, Range(gt=0, le=1)] = 0.65
    mask_span: Annotated[int, AT_LEAST_ONE] = 10
    dropout: Annotated[float, PROBABILITY] = 0.1
    layer_drop: Annotated[float, PROBABILITY] = 0.05
    norm: NormConfig = field(
        default_factory=lambda: NormConfig(kind="layernorm", alpha_init={"default": 0.5, "input": 2.0}))
    """layernorm | dyt: with bias, alpha0 0.5 (the paper's) except 2 for the DyT over the conv
    features (role ``input``: about 1 / their std at initialisation, docs/wav2vec2.md)."""
    norm_scope: str = "encoder"
    """Which norms ``norm`` sets: ``encoder`` (the post-extraction norm and every Transformer norm;
    the conv feature extractor keeps the baseline's GroupNorm / LayerNorms, as the paper's fairseq
    patch does) or ``all`` (the feature extractor's too: an ablation)."""
    feature_grad_scale: Annotated[float, NON_NEGATIVE] = 0.1
    """Gradient scale into the conv feature extractor (fairseq v1's feature_grad_mult; Base 0.1)."""
    quantizer_encoder_grad: bool = True
    """Let the quantizer's losses (diversity, contrastive targets) send gradient into the frontend,
    as fairseq v1 does; False reads a detached copy of the features."""
    compile_quantizer: bool = True
    """fairseq2 torch.compiles one step of its quantizer; on a CPU that costs 8-17 s at the first
    step (and again for new shapes). False runs it eagerly."""

    def __post_init__(self) -> None:
        if self.norm_order not in NORM_ORDERS:
            raise ValueError(f"model.norm_order must be pre or post, not {self.norm_order!r}")
        if self.norm_scope not in NORM_SCOPES:
            raise ValueError(f"model.norm_scope must be one of {', '.join(NORM_SCOPES)}, not {self.norm_scope!r}")
        if not self.conv_layers or any(len(layer) != 3 or min(layer) < 1 for layer in self.conv_layers):
            raise ValueError(f"conv_layers must be [channels, kernel, stride] triples of positive integers, "
                             f"not {self.conv_layers!r}")
        for whole, part in (("dim", "heads"), ("dim", "pos_conv_groups"), ("quantized_dim", "codebooks")):
            if getattr(self, whole) % getattr(self, part):
                raise ValueError(f"{whole} ({getattr(self, whole)}) must divide by {part} ({getattr(self, part)})")
        self.norm.check_roles(NORM_ROLES, "wav2vec 2.0")

    def fairseq2_config(self) -> Wav2Vec2Config:
        encoder = Wav2Vec2EncoderConfig(
            model_dim=self.dim, num_encoder_layers=self.layers, num_encoder_attn_heads=self.heads,
            ffn_inner_dim=self.ffn_dim, feature_dim=self.conv_layers[-1][0],
            feature_extractor_layer_descs=[tuple(layer) for layer in self.conv_layers],
            feature_extractor_layer_norm_convs=self.conv_layer_norm, feature_extractor_bias=self.conv_layer_norm,
            pos_conv_kernel_size=self.pos_conv_kernel, num_pos_conv_groups=self.pos_conv_groups,
            norm_order=NORM_ORDERS[self.norm_order], dropout_p=self.dropout, attn_dropout_p=self.dropout,
            # The encoder-input norm exists only in post-norm (Base) models, as in fairseq v1 and
            # fairseq2's own Large presets; pre-norm models end with the encoder's final norm.
            layer_norm_features=self.norm_order == "post",
            layer_drop_p=self.layer_drop, feature_grad_scale=self.feature_grad_scale,
        )
        return Wav2Vec2Config(
            encoder_config=encoder, final_dim=self.final_dim, quantized_dim=self.quantized_dim,
            num_codebooks=self.codebooks, num_codebook_entries=self.codebook_entries,
            num_distractors=self.distractors, max_temporal_mask_prob=self.mask_prob,
            temporal_mask_span_len=self.mask_span, quantizer_encoder_grad=self.quantizer_encoder_grad,
            codebook_sampling_temperature=tuple(self.codebook_temperature),
        )


class _EncoderFactory(Wav2Vec2EncoderFactory):
    def __init__(self, config: Wav2Vec2EncoderConfig, norm: NormConfig) -> None:
        super().__init__(config)
        self.norm = norm

    def create_layer_norm(self):  # fairseq2's hook for every encoder norm
        return make_norm(self.norm, self._config.model_dim)


class _Factory(Wav2Vec2Factory):
    def __init__(self, config: Wav2Vec2Config, norm: NormConfig) -> None:
        super().__init__(config)
        self.encoder_factory = _EncoderFactory(config.encoder_config, norm)

    def create_encoder_frontend(self):
        return self.encoder_factory.create_encoder_frontend()

    def create_encoder(self):
        return self.encoder_factory.create_encoder()


class GatedResidual(ResidualConnect):
    """fairseq2's residual connection with dyt-core's gate on the branch: ``gate(seqs) + residual``
    (the plain sum when the gate is the identity, i.e. for every kind but SkipInit and Fixup)."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, seqs: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.gate(seqs) + residual


def _gate_residuals(model: Wav2Vec2Model, norm: NormConfig) -> None:
    for layer in model.encoder.layers:
        if isinstance(layer, StandardTransformerEncoderLayer):
            layer.self_attn_residual = GatedResidual(residual_gate(norm, layer.self_attn, layer.self_attn.output_proj))
            layer.ffn_residual = GatedResidual(residual_gate(norm, layer.ffn, layer.ffn.output_proj))


class ContiguousGELU(nn.GELU):
    """GELU on a contiguous copy of its input. A conv layer with a LayerNorm hands its GELU the
    LayerNorm's output transposed back to (batch, channels, frames), a strided view, while the
    gradient from the next conv arrives contiguous; ATen's CPU ``gelu_backward`` on that mix of
    layouts took ~10 ms per tiny-config layer against ~0.6 ms on matching layouts, a quarter of a
    training step (docs/performance.md). The same function (values agree to float32 rounding); the
    next conv needs a contiguous input anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def _contiguous_conv_activations(model: Wav2Vec2Model) -> None:
    for layer in model.encoder_frontend.feature_extractor.layers:
        layer.activation = ContiguousGELU()


class RealFramesGroupNorm(nn.GroupNorm):
    """fairseq2's float32 GroupNorm over Base's first conv (one group per channel, statistics over
    time), with each example's statistics taken over its real frames only. PyTorch's GroupNorm has
    no notion of padding, so in a padded batch a short utterance's mean and variance would take in
    the padding, and its features would depend on what it is batched with (fairseq v1 avoids it in
    pretraining by cropping a batch to its shortest utterance, but not when fine-tuning). Padding
    frames come out as zeros. ``real_frames`` (per example) is set by the feature extractor's hooks
    for the length of its forward; None: every frame is real."""

    real_frames: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, batch, length = self.real_frames, x.shape[0], x.shape[-1]
        weight, bias = self.weight.float(), self.bias.float()
        if frames is None or min(frames) >= length:
            return nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type_as(x)
        real = (torch.arange(length, device=x.device) < torch.tensor(frames, device=x.device)[:, None]).float()
        groups = x.float().reshape(batch, self.num_groups, -1, length)  # (N, G, C / G, T)
        real = real[:, None, None, :]
        count = (real.sum((2, 3), keepdim=True) * groups.shape[2]).clamp_min(1)  # an utterance without a frame
        mean = (groups * real).sum((2, 3), keepdim=True) / count
        centred = (groups - mean) * real
        var = centred.square().sum((2, 3), keepdim=True) / count
        y = (centred * torch.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * weight[:, None] + bias[:, None]
        return (y * real[:, 0]).type_as(x)


def _group_norm_over_real_frames(model: Wav2Vec2Model) -> None:
    """Replace the feature extractor's GroupNorm (Base) by :class:`RealFramesGroupNorm`, same
    parameters, and tell it each forward's real frames from the batch layout."""
    extractor = model.encoder_frontend.feature_extractor
    first = extractor.layers[0]
    if not isinstance(first.group_norm, nn.GroupNorm):
        return
    old = first.group_norm
    first.group_norm = RealFramesGroupNorm(old.num_groups, old.num_channels, old.eps, old.affine,
                                           device=old.weight.device, dtype=old.weight.dtype)
    first.group_norm.load_state_dict(old.state_dict())
    kernel, stride = extractor.layer_descs[0][1:3]

    def set_real_frames(_module, args, kwargs):
        layout = args[1] if len(args) > 1 else kwargs["seqs_layout"]
        first.group_norm.real_frames = [(n - kernel) // stride + 1 for n in layout.seq_lens] if layout.padded else None

    def clear_real_frames(*_):
        first.group_norm.real_frames = None

    extractor.register_forward_pre_hook(set_real_frames, with_kwargs=True)
    extractor.register_forward_hook(clear_real_frames)


def _run_quantizer_eagerly(quantizer: nn.Module) -> None:
    def eager(_module, _inputs):
        torch.compiler.set_stance("force_eager")

    def restore(_module, _inputs, _output):
        torch.compiler.set_stance("default")

    quantizer.register_forward_pre_hook(eager)
    quantizer.register_forward_hook(restore)


def role_of(path: str) -> str:
    """The DyT role of a wav2vec 2.0 norm by its module path: ``input`` for the norm over the conv
    features, ``default`` for the others (the recipe's SPEC.role_of)."""
    return "input" if path == POST_EXTRACT else "default"


def build_wav2vec2(cfg: Wav2Vec2ModelConfig) -> Wav2Vec2Model:
    model = _Factory(cfg.fairseq2_config(), cfg.norm).create_model()
    if cfg.norm.kind != "layernorm":  # the norms fairseq2 builds without the hook
        in_scope = None if cfg.norm_scope == "all" else (lambda path: not path.startswith(FEATURE_EXTRACTOR + "."))
        convert_norms(model, cfg.norm, only=in_scope, role_of=role_of)
    _gate_residuals(model, cfg.norm)
    _contiguous_conv_activations(model)
    _group_norm_over_real_frames(model)
    apply_norm_free(model, cfg.norm)
    if not cfg.compile_quantizer:
        _run_quantizer_eagerly(model.quantizer)
    return model


def encode(model: Wav2Vec2Model, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features (b, frames, dim) without masking, and the number of valid frames per row."""
    layout = BatchLayout(waveforms.shape, seq_lens=lengths.tolist(), device=waveforms.device)
    seqs, layout, _ = model.encoder_frontend.extract_features(waveforms, layout)
    seqs, _ = model.encoder_frontend.process_features(seqs, layout, None)
    return model.encoder(seqs, layout), torch.tensor(layout.seq_lens, device=waveforms.device)
