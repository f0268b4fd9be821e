"""wav2vec 2.0 self-supervised pretraining for the shared harness: contrastive + diversity loss
(fairseq2's), random crops of 16 kHz speech; logged for training and validation: the contrastive
loss with every distractor kept, contrastive accuracy, codebook (soft) and code (hard) perplexity."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, ClassVar

import torch
from fairseq2.nn import BatchLayout
from torch.utils.data import Dataset

from dyt.train import ConfigError, TrainConfig
from dyt.train.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY
from dyt_data import cache_root

from .audio import (
    SAMPLE_RATE,
    AudioClip,
    AudioError,
    Utterance,
    audio_source_files,
    file_stats,
    inspected,
    is_hf_dataset,
    read_manifest,
    shared_recordings,
    utterances_from_hf_dataset,
)
from .model import Wav2Vec2ModelConfig, build_wav2vec2
from .speech import BUILD_VERSION, build, load_split


@dataclass
class SpeechDataConfig:
    train_manifest: str = ""
    """fairseq manifest (or a saved HF dataset with an Audio column) of training audio. Empty: the
    built-in synthetic sentences + keywords."""
    validation_manifest: str = ""
    """The same for held-out audio (other speakers). Empty with no train_manifest: built-in unseen voices."""
    builtin_sentences: Annotated[int, AT_LEAST_ONE] = 2000
    """Size of the built-in synthetic training set (sentences)."""
    crop_samples: Annotated[int, AT_LEAST_ONE] = 32_000
    """Longest training example in samples (longer audio is randomly cropped)."""
    min_samples: Annotated[int, NON_NEGATIVE] = 0
    """Shorter audio is left out of pretraining (counted and named when it happens). 0: the least
    the masker can work with (two mask spans at the model's mask probability)."""
    max_bad_fraction: Annotated[float, PROBABILITY] = 0.0
    """Share of unreadable / empty / multi-channel / truncated files that may be skipped, each named
    (0: any stops the run)."""
    num_proc: Annotated[int, AT_LEAST_ONE] = 1
    """Processes that decode a saved HF dataset's audio into the cache on first use (``datasets.map``
    num_proc, at most the CPUs this process may use); the copies are the same for any value."""

    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset({"num_proc"})
    """``--resume`` accepts these changed."""

    def source_files(self) -> list[Path]:
        """The user's audio files (``dyt.train.data_files``): the manifests and what they list, or
        the saved datasets; none for the built-in speech."""
        return [f for p in (self.train_manifest, self.validation_manifest) if p for f in audio_source_files(Path(p))]

    def builtin_version(self) -> str | None:
        """The built-in speech build this config trains on (``dyt.train.data_files``); None for the
        user's audio."""
        return None if self.train_manifest else f"built-in speech {BUILD_VERSION}"


@dataclass
class LossConfig:
    """fairseq v1's ``loss_weights``: Base [0.1, 10], Large [0.1, 0]."""

    diversity_weight: Annotated[float, NON_NEGATIVE] = 0.1
    features_penalty_weight: Annotated[float, NON_NEGATIVE] = 10.0
    """Weight of the mean square of the conv features (Base 10; Large, and the pre-LN configs here,
    0). It shrinks the features all through training; a LayerNorm after them is scale invariant and
    hides that, a DyT in tanh's linear range passes it on to the quantizer, whose logits then fade
    to uniform code sampling (docs/wav2vec2.md)."""


@dataclass
class SpeechEvalConfig:
    """The downstream evals' settings that go with a model's size: what ``python -m dyt_wav2vec2.eval``
    and ``dyt-wav2vec2-compare`` take for the run when their options leave them out. Pretraining
    reads none of them."""

    ctc_steps: Annotated[int, AT_LEAST_ONE] = 4000
    """CTC fine-tuning steps per seed (``--ctc-steps``): at lr 5e-3 the tiny model leaves CTC's
    all-blank plateau only after ~1000-1500 steps."""
    ctc_lr: Annotated[float, POSITIVE] = 5e-3
    """CTC fine-tuning's peak rate (``--ctc-lr``), chosen on the validation voices for tiny.yaml (and
    2e-3 for small.yaml: docs/wav2vec2.md)."""

    TRAINING_READS_NONE: ClassVar[bool] = True
    """``--resume`` and a comparison's check of its finished runs leave this section out
    (``dyt.train.config.resume_changes``)."""


@dataclass
class Wav2Vec2PretrainConfig:
    """wav2vec 2.0 pretraining (dyt-wav2vec2). model.norm switches LayerNorm / DyT."""

    model: Wav2Vec2ModelConfig = field(default_factory=Wav2Vec2ModelConfig)
    data: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: SpeechEvalConfig = field(default_factory=SpeechEvalConfig)

    def __post_init__(self) -> None:
        shortest = self.data.min_samples or masking_min_samples(self.model)
        if self.data.crop_samples < shortest:
            raise ConfigError(f"data.crop_samples={self.data.crop_samples} is shorter than the shortest audio "
                              f"pretraining takes ({shortest} samples: data.min_samples, or what the masking needs): "
                              "raise data.crop_samples")


def _first(items: list[str], count: int = 3) -> str:
    return "; ".join(items[:count]) + (f"; and {len(items) - count} more" if len(items) > count else "")


def check_audio(rows: list[Utterance], max_bad_fraction: float, min_samples: int, what: str,
                checked: Path | None = None, stats: dict[Path, os.stat_result] | None = None,
                known_bad: Sequence[str] = ()) -> list[Utterance]:
    """The rows training can use: every file checked as training reads it (:func:`inspect_audio`:
    readable, mono, not empty, not truncated; with ``checked``, once per version of the files for
    all ranks and launches, failures read again, :func:`inspected`), at least ``min_samples`` long at 16 kHz, each with
    the samples it holds at 16 kHz (what batching by length reads, whatever a manifest said). Bad files
    beyond the ``max_bad_fraction`` allowance stop the run, naming the first; what is left out is
    said in one line per reason (how many, why, the first few names), on rank 0. ``known_bad``: what is
    wrong with each of the source's items that never became a row (a saved dataset's undecodable rows),
    counted as bad files."""
    if not rows and not known_bad:
        raise AudioError(f"{what}: no audio files listed (a manifest holds the audio root on its first line, then "
                         "one 'relative/path<TAB>num_samples' row per file)")
    good, bad, short = [], list(known_bad), []
    for row, samples in zip(rows, inspected(rows, checked, stats)):
        if isinstance(samples, str):
            bad.append(samples)
        else:
            (good if samples >= min_samples else short).append(replace(row, num_samples=samples))
    total = len(rows) + len(known_bad)
    if len(bad) > max_bad_fraction * total:
        raise AudioError(f"{what}: {len(bad)} of {total} files are bad (allowed: "
                         f"{max_bad_fraction:.1%}, data.max_bad_fraction); first: {bad[0]}")
    loud = os.environ.get("RANK", "0") in ("", "0")
    if bad and loud:
        print(f"{what}: left out {len(bad)} bad file(s) of {total} (allowed: {max_bad_fraction:.1%}): "
              f"{_first(bad)}", flush=True)
    shortest = f"shorter than {min_samples} samples ({min_samples / SAMPLE_RATE:.2f} s at 16 kHz)"
    if not good:
        raise AudioError(f"{what}: no usable utterance: {len(short)} of {total} files are {shortest}, "
                         f"{len(bad)} bad; first short: {_first([str(r.path) for r in short])}; give longer audio "
                         "or lower data.min_samples / the model's masking (model.mask_prob, model.mask_span)")
    if short and loud:
        print(f"{what}: left out {len(short)} file(s) of {total} {shortest}, too short for the model's "
              f"masking or data.min_samples: {_first([str(r.path) for r in short])}", flush=True)
    return good


def audio_source(path: Path, num_proc: int = 1) -> tuple[list[Utterance], list[str]]:
    """A fairseq manifest, or a saved HF dataset with an Audio column (decoded by ``num_proc`` processes):
    its rows, and what is wrong with each of the dataset's rows that cannot be decoded."""
    if is_hf_dataset(path):
        return utterances_from_hf_dataset(path, cache_root() / "hf-audio", num_proc=num_proc)
    return read_manifest(path), []


def masking_min_samples(model: Wav2Vec2ModelConfig) -> int:
    """Samples needed for fairseq2's masker to place two spans at the configured mask probability."""
    stride = math.prod(layer[2] for layer in model.conv_layers)
    return (math.ceil(2 * model.mask_span / model.mask_prob) + 2) * stride


def builtin_speech(cfg: SpeechDataConfig) -> Path:
    """The built-in speech folder at the size ``cfg`` asks for (built on first use): pretraining, the
    compare and the evals all ask through here, so none of them rebuilds it at another size."""
    return build(per_split={"train": cfg.builtin_sentences, "validation": 200, "test": 200})


def pretraining_audio(cfg: SpeechDataConfig, min_samples: int) -> tuple[list[Utterance], list[Utterance]]:
    if cfg.train_manifest:
        if not cfg.validation_manifest:
            raise AudioError("data.validation_manifest is empty: give a manifest of held-out speakers")
        (train, train_bad), (validation, validation_bad) = (audio_source(Path(p), cfg.num_proc)
                                                            for p in (cfg.train_manifest, cfg.validation_manifest))
    else:
        data = builtin_speech(cfg)
        train = load_split(data, "sentences-train") + load_split(data, "keywords-train")
        validation = load_split(data, "sentences-validation")
        train_bad = validation_bad = []
    checked, stats = cache_root() / "audio-checks", file_stats([*train, *validation])  # each file stat'ed once
    train, validation = (check_audio(train, cfg.max_bad_fraction, min_samples, "training audio", checked, stats,
                                     train_bad),
                         check_audio(validation, cfg.max_bad_fraction, min_samples, "validation audio", checked, stats,
                                     validation_bad))
    if cfg.train_manifest and (shared := shared_recordings(train, validation, checked, stats)):
        held, trained = shared[0]  # (the built-in splits are disjoint by voice family and transcript)
        raise AudioError(f"validation audio: {len({h for h, _ in shared})} of {len({r.path for r in validation})} files "
                         f"are also training audio (the same file, or the same bytes); first: {held} = {trained} "
                         "(data.validation_manifest, data.train_manifest): held-out audio must be recordings training "
                         "never reads")
    return train, validation


class Waveforms(Dataset):
    """The rows' audio, each an :class:`AudioClip` that the collate reads a crop of."""

    def __init__(self, rows: list[Utterance]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> AudioClip:
        return AudioClip(self.rows[index].path)


def normalize_waveform(wave: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance: what the model reads in pretraining and in every eval, so that no
    number depends on a recording's level."""
    return (wave - wave.mean()) / (wave.std() + 1e-5)


def crop_and_batch(waveforms: list[torch.Tensor | AudioClip], crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly crop to ``crop`` samples, normalise each (:func:`normalize_waveform`), right-pad. A
    clip is read for its crop alone; the draws depend on the lengths only, so a clip and its loaded
    waveform give the same batch."""
    pieces = []
    for wave in waveforms:
        start, length = 0, wave.numel()
        if length > crop:
            start, length = int(torch.randint(0, length - crop + 1, ())), crop
        pieces.append(normalize_waveform(wave.span(start, length) if isinstance(wave, AudioClip)
                                         else wave[start : start + length]))
    lengths = torch.tensor([p.numel() for p in pieces])
    return torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True), lengths


def crop_to_shortest(waveforms: list[torch.Tensor | AudioClip], crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pretraining batch: every clip randomly cropped to the batch's shortest (and to at most
    ``crop`` samples), normalised. fairseq2's masker draws as many mask spans for every row as the
    batch's shortest row allows, so a padded batch of mixed lengths masks its long clips far less
    than the config asks; fairseq v1 and fairseq2's recipes crop to the shortest too, and batch
    clips of like length (``train_lengths``) so that little is cut."""
    return crop_and_batch(waveforms, min(crop, *(wave.numel() for wave in waveforms)))


def by_length(rows: list[Utterance], crop: int) -> list[Utterance]:
    """``rows`` from the shortest to the longest (to ``crop`` samples; ties by path): consecutive
    rows make batches that :func:`crop_to_shortest` cuts little."""
    return sorted(rows, key=lambda r: (min(r.num_samples, crop), str(r.path)))


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

    def train_lengths(self) -> list[int]:
        """Each clip's samples as cropped: the harness batches clips of like length."""
        return [min(r.num_samples, self.config.data.crop_samples) for r in self.train_rows]

    def eval_dataset(self):
        """The validation clips by length: the harness scores positions spread evenly over them and
        batches neighbours, which are of like length."""
        return Waveforms(by_length(self.validation_rows, self.config.data.crop_samples))

    def collate(self, waveforms):
        return crop_to_shortest(waveforms, self.config.data.crop_samples)

    def loss(self, model, batch):
        anneal_per_update(model)
        return pretraining_loss(model, batch, self.config.loss)


def anneal_per_update(engine) -> None:
    """Anneal the Gumbel temperature per optimizer update, as wav2vec 2.0 does (``temperature *
    decay ** update``): fairseq2's quantizer counts its training forwards, so with ``train.grad_accum``
    micro-batches a step it would anneal that many times too fast (Base: 8, Large: 32). Set to the
    DeepSpeed engine's ``global_steps`` (restored on ``--resume``) before each training forward; a plain
    module (tests, evals) keeps fairseq2's count."""
    steps = getattr(engine, "global_steps", None)
    if steps is not None and engine.training:
        engine.module.quantizer.num_updates.fill_(steps)


def pretraining_loss(model, batch: tuple[torch.Tensor, torch.Tensor], weights: LossConfig):
    """fairseq2's wav2vec 2.0 loss per masked frame, and the scores logged with it: the one loss of
    pretraining, its validation and the held-out ``contrastive`` eval."""
    waveforms, lengths = batch
    layout = BatchLayout(waveforms.shape, seq_lens=lengths.tolist(), device=waveforms.device)
    losses, output = model(waveforms, layout, diversity_weight=weights.diversity_weight,
                           features_penalty_weight=weights.features_penalty_weight)
    targets = output.num_targets
    return losses.aggregate / targets, {
        "units": lengths.sum().item() / SAMPLE_RATE,  # audio seconds
        "contrastive": losses.contrastive.item() / targets,
        "codebook_perplexity": output.quantizer_output.prob_perplexity.item(),
        "code_perplexity": output.quantizer_output.code_perplexity.item(),
        **contrastive_metrics(output.logits),
    }
