"""wav2vec 2.0 self-supervised pretraining for the shared harness: contrastive + diversity loss
(fairseq2's), random crops of 16 kHz speech; logged for training and validation: the contrastive
loss with every distractor kept, contrastive accuracy, codebook (soft) and code (hard) perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fairseq2.nn import BatchLayout
from torch.utils.data import Dataset

from dyt.debian import cache_root
from dyt.train import TrainConfig

from .audio import (
    SAMPLE_RATE,
    AudioError,
    Utterance,
    is_hf_dataset,
    load_audio,
    read_manifest,
    utterances_from_hf_dataset,
)
from .model import Wav2Vec2ModelConfig, build_wav2vec2
from .speech import build, load_split


@dataclass
class SpeechDataConfig:
    train_manifest: str = ""
    """fairseq manifest (or a saved HF dataset with an Audio column) of training audio. Empty: the
    built-in synthetic sentences + keywords."""
    validation_manifest: str = ""
    """The same for held-out audio (other speakers). Empty with no train_manifest: built-in unseen voices."""
    builtin_sentences: int = 2000
    """Size of the built-in synthetic training set (sentences)."""
    crop_samples: int = 32_000
    """Longest training example in samples (longer audio is randomly cropped)."""
    min_samples: int = 0
    """Shorter audio is left out of pretraining. 0: the least the masker can work with (two mask
    spans at the model's mask probability)."""
    max_bad_fraction: float = 0.0
    """Share of unreadable / empty / multi-channel files that may be skipped (0: any stops the run)."""


@dataclass
class LossConfig:
    diversity_weight: float = 0.1
    features_penalty_weight: float = 10.0


@dataclass
class Wav2Vec2PretrainConfig:
    """wav2vec 2.0 pretraining (dyt-wav2vec2). model.norm switches LayerNorm / DyT."""

    model: Wav2Vec2ModelConfig = field(default_factory=Wav2Vec2ModelConfig)
    data: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def check_audio(rows: list[Utterance], max_bad_fraction: float, min_samples: int, what: str) -> list[Utterance]:
    """Keep readable mono rows of at least ``min_samples``; stop when bad files exceed the allowance."""
    import soundfile

    good, bad = [], []
    for row in rows:
        try:
            info = soundfile.info(str(row.path))
            if info.frames == 0:
                raise AudioError(f"{row.path}: empty audio (0 samples)")
            if info.channels != 1:
                raise AudioError(f"{row.path}: {info.channels} channels; wav2vec 2.0 takes mono audio")
        except (soundfile.LibsndfileError, RuntimeError) as error:
            bad.append(f"{row.path}: unreadable audio ({error})")
            continue
        except AudioError as error:
            bad.append(str(error))
            continue
        if row.num_samples >= min_samples:
            good.append(row)
    if len(bad) > max_bad_fraction * len(rows):
        raise AudioError(f"{what}: {len(bad)} of {len(rows)} files are bad (allowed: "
                         f"{max_bad_fraction:.1%}); first: {bad[0]}")
    if bad:
        print(f"{what}: skipping {len(bad)} bad file(s) of {len(rows)} (allowed {max_bad_fraction:.1%}): {bad[:3]}")
    if not good:
        raise AudioError(f"{what}: no utterance of at least {min_samples} samples")
    return good


def audio_source(path: Path) -> list[Utterance]:
    """A fairseq manifest, or a saved HF dataset with an Audio column."""
    if is_hf_dataset(path):
        return utterances_from_hf_dataset(path, cache_root() / "hf-audio")
    return read_manifest(path)


def masking_min_samples(model: Wav2Vec2ModelConfig) -> int:
    """Samples needed for fairseq2's masker to place two spans at the configured mask probability."""
    stride = math.prod(layer[2] for layer in model.conv_layers)
    return (math.ceil(2 * model.mask_span / model.mask_prob) + 2) * stride


def pretraining_audio(cfg: SpeechDataConfig, min_samples: int) -> tuple[list[Utterance], list[Utterance]]:
    if cfg.train_manifest:
        if not cfg.validation_manifest:
            raise AudioError("data.validation_manifest is empty: give a manifest of held-out speakers")
        train, validation = (audio_source(Path(p)) for p in (cfg.train_manifest, cfg.validation_manifest))
    else:
        data = build(per_split={"train": cfg.builtin_sentences, "validation": 200, "test": 200})
        train = load_split(data, "sentences-train") + load_split(data, "keywords-train")
        validation = load_split(data, "sentences-validation")
    return (check_audio(train, cfg.max_bad_fraction, min_samples, "training audio"),
            check_audio(validation, cfg.max_bad_fraction, min_samples, "validation audio"))


class Waveforms(Dataset):
    def __init__(self, rows: list[Utterance]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_audio(self.rows[index].path)


def crop_and_batch(waveforms: list[torch.Tensor], crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly crop to ``crop`` samples, normalise each to zero mean / unit variance, right-pad."""
    pieces = []
    for wave in waveforms:
        if wave.numel() > crop:
            start = int(torch.randint(0, wave.numel() - crop + 1, ()))
            wave = wave[start : start + crop]
        pieces.append((wave - wave.mean()) / (wave.std() + 1e-5))
    lengths = torch.tensor([p.numel() for p in pieces])
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True), lengths


def contrastive_metrics(logits: torch.Tensor) -> dict[str, float]:
    """Scores of the contrastive task that a collapsed quantizer cannot game.

    fairseq2 sets a distractor's logit to -inf when it equals the target and leaves it out of the
    loss, so a model whose targets are all one code has no distractors left and scores a low loss.
    Here such a distractor is scored as what it is, a tie with the target: ``contrastive_kept`` is
    the cross-entropy over all 1 + K candidates, and ``contrastive_accuracy`` is the chance that the
    target ranks first with ties broken at random (1 / (1 + d) for a frame whose target beats every
    other distractor and ties its d copies), so guessing scores 1 / (K + 1) whatever the codebook
    does, and a collapsed one exactly that. ``distractors_equal_target`` is the share fairseq2
    dropped."""
    logits = logits.detach().float().flatten(0, -2)  # (masked frames, 1 + K)
    target = logits[:, :1]
    dropped = torch.isneginf(logits[:, 1:])
    kept = torch.cat([target, torch.where(dropped, target, logits[:, 1:])], dim=1)
    zeros = torch.zeros(len(kept), dtype=torch.long, device=kept.device)
    return {
        "contrastive_kept": torch.nn.functional.cross_entropy(kept, zeros).item(),
        "contrastive_accuracy": ((logits[:, 0] > logits[:, 1:].amax(1)) / (1 + dropped.sum(1))).mean().item(),
        "distractors_equal_target": dropped.float().mean().item(),
    }


COLLAPSE_PERPLEXITY = 0.95
"""A codebook perplexity at or above this share of its maximum is uniform code sampling."""


def collapse_reason(metrics: dict[str, float], model: Wav2Vec2ModelConfig) -> str | None:
    """Why a run's validation ``metrics`` (``eval/...``) show a collapsed model, or None.

    Collapsed: codebook perplexity >= 95% of its maximum (the quantizer's logits no longer depend on
    the audio, so Gumbel sampling picks codes uniformly), or contrastive accuracy under twice the
    1 / (K + 1) of guessing."""
    most = model.codebooks * model.codebook_entries
    if metrics["eval/codebook_perplexity"] >= COLLAPSE_PERPLEXITY * most:
        return f"codebook perplexity {metrics['eval/codebook_perplexity']:.0f} of {most}"
    chance = 1 / (model.distractors + 1)
    if metrics["eval/contrastive_accuracy"] < 2 * chance:
        return f"contrastive accuracy {metrics['eval/contrastive_accuracy']:.3f}, chance {chance:.3f}"
    return None


class Wav2Vec2PretrainTask:
    def __init__(self, config: Wav2Vec2PretrainConfig):
        self.config = config
        shortest = config.data.min_samples or masking_min_samples(config.model)
        self.train_rows, self.validation_rows = pretraining_audio(config.data, shortest)

    def build_model(self):
        model = build_wav2vec2(self.config.model)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            hours = sum(r.num_samples for r in self.train_rows) / SAMPLE_RATE / 3600
            print(f"wav2vec 2.0 {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                  f"norm={self.config.model.norm.kind}, {len(self.train_rows)} training utterances ({hours:.2f} h)",
                  flush=True)
        return model

    def train_dataset(self):
        return Waveforms(self.train_rows)

    def eval_dataset(self):
        return Waveforms(self.validation_rows)

    def collate(self, waveforms):
        return crop_and_batch(waveforms, self.config.data.crop_samples)

    def loss(self, model, batch):
        waveforms, lengths = batch
        layout = BatchLayout(waveforms.shape, seq_lens=lengths.tolist(), device=waveforms.device)
        losses, output = model(waveforms, layout, diversity_weight=self.config.loss.diversity_weight,
                               features_penalty_weight=self.config.loss.features_penalty_weight)
        targets = output.num_targets
        return losses.aggregate / targets, {
            "units": lengths.sum().item() / SAMPLE_RATE,  # audio seconds
            "contrastive": losses.contrastive.item() / targets,
            "codebook_perplexity": output.quantizer_output.prob_perplexity.item(),
            "code_perplexity": output.quantizer_output.code_perplexity.item(),
            **contrastive_metrics(output.logits),
        }
