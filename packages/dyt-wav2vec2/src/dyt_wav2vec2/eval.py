"""Downstream speech evals of a pretrained wav2vec 2.0 checkpoint (or, with ``--random-init``, of
the same model untrained: the row every table needs to show what pretraining bought), each over
several seeds:

0. ``contrastive``: the pretraining task itself (masking, distractors, quantized targets as in
   validation) on held-out speech: unseen synthetic voices and the real Asterisk recordings;
1. keyword classification (36 words: digits + NATO alphabet) — a linear probe on frozen, mean-pooled
   encoder features standardised by the training split's statistics, and a full fine-tune; accuracy
   on unseen synthetic voices and on the real Asterisk recordings of the same words;
2. CTC speech recognition (characters) fine-tuned on synthetic sentences; character and word error
   rates on unseen voices saying unseen sentences, and on real recordings of those sentences.

Every head reads its features standardised by the training split's statistics (``Standardize``).

    python -m dyt_wav2vec2.eval --run runs/wav2vec2/tiny --evals probe finetune ctc --seeds 0 1 2

They run on a CUDA GPU where torch sees one (``--device``), else on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchaudio
import yaml
from fairseq2.models.wav2vec2.masker import Wav2Vec2Masker
from fairseq2.nn import BatchLayout
from fairseq2.nn.utils.mask import compute_row_mask
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dyt.errors import CommandParser, DistinctValues, help_description, options_given, output_file, user_path
from dyt.train import check_run, load_config, run_model_builder, user_errors
from dyt.train.checkpoint import config_digest, pin_evaluated_checkpoint
from dyt.train.cli import add_device_argument, backends_for_device
from dyt.train.compare import eval_out_seeds, mean_std, read_eval_out
from dyt.train.config import AT_LEAST_ONE, POSITIVE, SEED
from dyt.train.finetune import (
    SCHEDULES,
    Classification,
    FinetuneConfig,
    FinetuneResult,
    LengthBatches,
    Standardize,
    evaluating,
    finetune,
    module_device,
    on_device,
)
from dyt.train.trainer import seed_everything, to_device

from .audio import AudioClip, AudioError, Utterance, load_audio
from .model import build_wav2vec2, encode
from .speech import KEYWORDS, load_split, speech_identity
from .task import (
    SpeechEvalConfig,
    Wav2Vec2PretrainConfig,
    builtin_speech,
    by_length,
    crop_and_batch,
    crop_to_shortest,
    masking_min_samples,
    normalize_waveform,
    pretraining_loss,
)

CHARACTERS = ["<blank>", " ", "'"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
KEYWORD_TESTS = {"unseen voices": "keywords-test", "real recordings": "real-keywords"}
CTC_TESTS = {"unseen voices": "sentences-test", "real recordings": "real-sentences-test"}


def load_pretrained(run_dir: Path, pretrained: bool = True, device: torch.device | str = "cpu"):
    """The run's config and a builder of its model on ``device``: with the trained weights, or
    (``pretrained`` False) freshly initialised, seeded by the caller like every fine-tuning run; built
    on the CPU and moved, so a seed draws the same weights on any device."""
    config = load_config(Wav2Vec2PretrainConfig, run_dir / "config.yaml", check_files=False)
    config.model.compile_quantizer = False  # eager: evals are small, compiling costs more than it saves
    backends_for_device(config, device, str(run_dir))
    make = run_model_builder(run_dir, lambda: build_wav2vec2(config.model), pretrained)
    return config, lambda: make().to(device)


class LabeledAudio(Dataset):
    def __init__(self, rows: list[Utterance], labels: list):
        self.rows, self.labels = rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return load_audio(self.rows[index].path), self.labels[index]


def _collate_labels(items):
    waves, labels = zip(*items)
    return crop_and_batch(list(waves), crop=10**9), torch.tensor(labels)


def _keyword_rows(data: Path, name: str) -> LabeledAudio:
    rows = load_split(data, name)
    return LabeledAudio(rows, [KEYWORDS.index(r.text) for r in rows])


def pooled(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean of the encoder's output over each utterance's valid frames."""
    features, frames = encode(model, *batch)
    keep = (torch.arange(features.shape[1], device=frames.device)[None, :] < frames[:, None]).unsqueeze(-1)
    keep = keep.to(features.dtype)
    return (features * keep).sum(1) / keep.sum(1)


class KeywordClassifier(nn.Module):
    """The encoder's mean-pooled features, standardised by the training split's statistics before
    fine-tuning (``fit_standardize``, as the probe's), then a linear head; the encoder trains too."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone = backbone
        self.standardize = Standardize(torch.zeros(dim), torch.ones(dim))
        self.head = nn.Linear(dim, len(KEYWORDS))

    def forward(self, batch):
        return self.head(self.standardize(pooled(self.backbone, batch)))

    def fit_standardize(self, dataset: LabeledAudio) -> KeywordClassifier:
        """Set the head's input statistics from every utterance of ``dataset``, as the encoder is now."""
        with evaluating(self):
            self.standardize = Standardize.fit(_frozen_features(self.backbone, dataset).tensors[0])
        return self


def _frozen_features(model: nn.Module, dataset: LabeledAudio) -> TensorDataset:
    """Mean-pooled features of every utterance, computed on ``model``'s device and kept on the CPU."""
    from tqdm.auto import tqdm

    chunks, labels = [], []
    batches = DataLoader(dataset, batch_size=32, collate_fn=_collate_labels)
    with torch.no_grad():
        for batch, label in tqdm(batches, desc="keyword features", leave=False, dynamic_ncols=True):
            chunks.append(pooled(model, to_device(batch, module_device(model))).cpu())
            labels.append(label)
    return TensorDataset(torch.cat(chunks), torch.cat(labels))


def standardized(splits: dict[str, TensorDataset], by: str = "train") -> dict[str, TensorDataset]:
    """Every split's features shifted and scaled per dimension by the ``by`` split's mean and std
    (``Standardize``: the probe ranks content, not the feature scale of the encoder)."""
    standardize = Standardize.fit(splits[by].tensors[0])
    return {name: TensorDataset(standardize(d.tensors[0]), d.tensors[1]) for name, d in splits.items()}


def keyword_eval(run_dir: Path, data: Path, mode: str, cfg: FinetuneConfig, seeds: list[int],
                 pretrained: bool = True, device: torch.device | str = "cpu") -> Iterator[FinetuneResult]:
    """``probe``: a linear head on frozen features; ``finetune``: the whole encoder trains too. One
    result per seed, yielded as each finishes."""
    config, make = load_pretrained(run_dir, pretrained, device)
    splits = {"train": _keyword_rows(data, "keywords-train"), "validation": _keyword_rows(data, "keywords-validation"),
              **{name: _keyword_rows(data, manifest) for name, manifest in KEYWORD_TESTS.items()}}
    if mode == "probe":
        def probe_features(seed: int) -> dict[str, TensorDataset]:
            seed_everything(seed)  # an untrained backbone is drawn from the seed
            backbone = make().eval()
            return standardized({name: _frozen_features(backbone, rows) for name, rows in splits.items()})

        def build_probe() -> nn.Module:
            return nn.Linear(config.model.dim, len(KEYWORDS))

        # the trained backbone's features once; an untrained one's per seed, so the random-init row's
        # spread covers the backbone's draw as a pretrained row's covers its pretraining (not the head's alone)
        if pretrained:
            trained = probe_features(seeds[0])
            per_seed = {seed: trained for seed in seeds}
        else:
            per_seed = {seed: probe_features(seed) for seed in seeds}
        builder, collate = build_probe, lambda items: (torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))
    else:
        def build_classifier() -> nn.Module:
            return KeywordClassifier(make(), config.model.dim).fit_standardize(splits["train"])

        per_seed = {seed: splits for seed in seeds}
        builder, collate = build_classifier, _collate_labels
    for seed in seeds:
        yield finetune(builder, per_seed[seed]["train"], per_seed[seed]["validation"],
                       {name: per_seed[seed][name] for name in KEYWORD_TESTS}, collate, Classification(len(KEYWORDS)),
                       cfg, seed, desc=f"keywords {mode} ({config.model.norm.kind}) seed {seed}", device=device)


# ---------------------------------------------------------------- CTC speech recognition

def text_to_ids(text: str) -> torch.Tensor:
    return torch.tensor([CHARACTERS.index(c) for c in text])


def greedy_decode(log_probs: torch.Tensor, frames: torch.Tensor) -> list[str]:
    """Best path: most likely character per frame, repeats merged, blanks dropped."""
    texts = []
    for row, length in zip(log_probs.argmax(-1).cpu(), frames.tolist()):
        ids = torch.unique_consecutive(row[:length])
        texts.append("".join(CHARACTERS[i] for i in ids.tolist() if i != 0))
    return [" ".join(t.split()) for t in texts]


def word_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Word edits (substitutions + insertions + deletions) over reference words, corpus-level."""
    edits = sum(torchaudio.functional.edit_distance(r.split(), h.split()) for h, r in zip(hypotheses, references))
    words = sum(len(r.split()) for r in references)
    return edits / max(1, words)


def character_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Character edits (spaces included) over reference characters, corpus-level: moves well
    before whole words come out right, so it shows a model that is learning where WER is still 1."""
    edits = sum(torchaudio.functional.edit_distance(list(r), list(h)) for h, r in zip(hypotheses, references))
    return edits / max(1, sum(len(r) for r in references))


@dataclass(frozen=True)
class CTCMasking:
    """Masking of the encoder's input while CTC fine-tunes, fairseq's wav2vec 2.0 fine-tuning
    regulariser (``mask_prob``, ``mask_channel_prob``): spans of ``time_span`` frames get the
    pretrained mask vector, spans of ``channel_span`` channels are zeroed, each up to its
    probability of the row (spans overlap, so less). Off in evaluation. ``channel_span`` 8 of the
    tiny model's 64 channels is the share of fairseq's 64 of 512."""

    time_prob: float = 0.0
    time_span: int = 10
    channel_prob: float = 0.0
    channel_span: int = 8

    def __post_init__(self) -> None:
        for name in ("time_prob", "channel_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"CTC masking {name} must be in [0, 1), not {getattr(self, name)!r}")
        for name in ("time_span", "channel_span"):
            if getattr(self, name) < 1:
                raise ValueError(f"CTC masking {name} must be at least 1, not {getattr(self, name)!r}")

    @property
    def active(self) -> bool:
        return self.time_prob > 0 or self.channel_prob > 0


@dataclass(frozen=True)
class CTCSettings:
    """How the CTC eval fine-tunes, apart from the seeds: its own budget (the keyword evals learn
    within a few hundred steps), peak rate, schedule and input masking. Defaults chosen on the
    validation voices (docs/wav2vec2.md)."""

    steps: int = SpeechEvalConfig.ctc_steps
    """A run's own comes from its config's ``eval.ctc_steps`` (:func:`resolve_ctc_budget`)."""
    lr: float = SpeechEvalConfig.ctc_lr
    """The peak rate; a run's own comes from its config's ``eval.ctc_lr``."""
    schedule: str = "tri-stage"
    """fairseq's wav2vec 2.0 fine-tuning schedule (``dyt.train.finetune.tri_stage``); a constant
    rate left the weights where the last noisy steps put them (validation CER 0.655 vs 0.618)."""
    masking: CTCMasking = CTCMasking()
    """Off: fine-tuning's masking slowed CTC more than it helped."""
    batch_size: int = 8
    """Sentences per batch, grouped by length."""

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(lr=self.lr, batch_size=self.batch_size, epochs=10**6, max_steps=self.steps,
                              eval_every=max(1, self.steps // 8), patience=self.steps, clip_grad_norm=10.0,
                              schedule=self.schedule)


class FinetuneMasker(Wav2Vec2Masker):
    """:class:`CTCMasking` as a fairseq2 masker, drawn row by row with fairseq2's
    ``compute_row_mask`` (its own masker draws the same number of spans for every row of a batch and
    rejects rows shorter than two spans; CTC batches hold sentences of 0.4-62 s): a row too short
    for one span stays unmasked. Masked frames get ``mask_embed``, the vector pretraining learned
    for them."""

    def __init__(self, masking: CTCMasking, mask_embed: nn.Parameter):
        super().__init__()
        self.masking = masking
        self.mask_embed = mask_embed

    def forward(self, seqs: torch.Tensor, seqs_layout: BatchLayout) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.masking
        batch, length, dim = seqs.shape
        time = torch.zeros(batch, length, dtype=torch.bool, device=seqs.device)
        channels = torch.zeros(batch, dim, dtype=torch.bool, device=seqs.device)
        for row, frames in enumerate(seqs_layout.seq_lens):
            if m.time_prob > 0 and frames > m.time_span:
                spans = compute_row_mask((1, frames), m.time_span, m.time_prob, device=seqs.device)
                if spans is not None and spans.numel():
                    time[row, :frames] = spans[0]
            if m.channel_prob > 0 and dim > m.channel_span:
                spans = compute_row_mask((1, dim), m.channel_span, m.channel_prob, device=seqs.device)
                if spans is not None and spans.numel():
                    channels[row] = spans[0]
        seqs = torch.where(time[..., None], self.mask_embed.to(seqs.dtype), seqs)
        return seqs.masked_fill(channels[:, None, :], 0.0), time


class CTCModel(nn.Module):
    """A character head on the encoder, reading the conv feature extractor's output computed once
    per utterance (``conv_features``): fine-tuning keeps the feature extractor frozen, as fairseq's
    wav2vec 2.0 fine-tuning does (``feature_grad_mult 0``); the post-extraction norm, projection,
    positional conv and Transformer train, with the encoder's input masked in training
    (``masking``). The head reads the encoder's output standardised by its statistics over the
    training frames before fine-tuning (``fit_standardize``), as the keyword probe does: DyT's
    bounded outputs spread less than a LayerNorm's."""

    def __init__(self, backbone: nn.Module, dim: int, masking: CTCMasking = CTCMasking()):
        super().__init__()
        backbone.encoder_frontend.feature_extractor = None  # its output is cached
        self.backbone = backbone
        self.masker = FinetuneMasker(masking, backbone.masker.temporal_mask_embed) if masking.active else None
        self.standardize = Standardize(torch.zeros(dim), torch.ones(dim))
        self.head = nn.Linear(dim, len(CHARACTERS))

    def encoded(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The encoder's output for cached conv features (batch, frames, dim); masked in training."""
        layout = BatchLayout(features.shape[:2], seq_lens=frames.tolist(), device=features.device)
        frontend = self.backbone.encoder_frontend
        masker = self.masker if self.training else None
        seqs, _ = frontend.process_features(frontend.post_extract_layer_norm(features), layout, masker)
        return self.backbone.encoder(seqs, layout)

    def forward(self, features: torch.Tensor, frames: torch.Tensor):
        return self.head(self.standardize(self.encoded(features, frames))).log_softmax(-1), frames

    def fit_standardize(self, dataset: Dataset, lengths: list[int], batch_size: int = 8) -> CTCModel:
        """Set the head's input statistics from every valid frame of ``dataset`` (batches of similar
        length: little padding to run), as the encoder is now."""
        batches = LengthBatches(lengths, batch_size, torch.Generator().manual_seed(0))
        device = module_device(self)

        def valid_frames():
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_collate_transcripts)
            for (features, frames), _ in on_device(loader, device):
                encoded = self.encoded(features, frames)
                yield encoded[torch.arange(encoded.shape[1], device=device)[None, :] < frames[:, None]]

        with evaluating(self):
            self.standardize = Standardize.fit(valid_frames())
        return self


def conv_features(model: nn.Module, rows: list[Utterance]) -> list[torch.Tensor]:
    """The feature extractor's output (frames, channels) of each utterance, one at a time (without
    padding: what the CTC eval caches), read from the normalised waveform as in pretraining; computed
    on ``model``'s device, kept on the CPU."""
    from tqdm.auto import tqdm

    extractor = model.encoder_frontend.feature_extractor.eval()
    device = module_device(model)
    out = []
    with torch.no_grad():
        for row in tqdm(rows, desc="CTC features", leave=False, dynamic_ncols=True):
            wave = normalize_waveform(load_audio(row.path))[None].to(device)
            features, _ = extractor(wave, BatchLayout(wave.shape, seq_lens=[wave.shape[1]], device=device))
            out.append(features[0].cpu())
    return out


class Transcribed(Dataset):
    """Cached conv features with their transcripts."""

    def __init__(self, features: list[torch.Tensor], rows: list[Utterance]):
        self.features, self.texts = features, [r.text for r in rows]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int):
        return self.features[index], self.texts[index]


def _collate_transcripts(items):
    features, texts = zip(*items)
    frames = torch.tensor([len(f) for f in features])
    return (nn.utils.rnn.pad_sequence(list(features), batch_first=True), frames), list(texts)


class CTCObjective:
    """CTC loss over characters; scored by character (selects: it moves before words come out
    right) and word error rates of greedy decoding; keeps the first reference/hypothesis pairs."""

    selection = "cer"
    higher_is_better = False
    examples = 3

    @staticmethod
    def _ctc(log_probs: torch.Tensor, frames: torch.Tensor, texts: list[str]) -> torch.Tensor:
        targets = [text_to_ids(t) for t in texts]
        return nn.functional.ctc_loss(log_probs.transpose(0, 1), torch.cat(targets).to(log_probs.device), frames,
                                      torch.tensor([len(t) for t in targets]), zero_infinity=True)

    def loss(self, model: CTCModel, batch) -> torch.Tensor:
        (features, frames), texts = batch
        return self._ctc(*model(features, frames), texts)

    def evaluate(self, model: CTCModel, loader: DataLoader) -> tuple[dict[str, float], list[tuple[str, str]]]:
        hypotheses, references, loss_sum = [], [], 0.0
        for batch in loader:
            (features, frames), texts = batch
            log_probs, frames = model(features, frames)
            loss_sum += self._ctc(log_probs, frames, texts).item() * len(texts)
            hypotheses += greedy_decode(log_probs, frames)
            references += texts
        scores = {"loss": loss_sum / max(1, len(references)), "cer": character_error_rate(hypotheses, references),
                  "wer": word_error_rate(hypotheses, references)}
        return scores, list(zip(references, hypotheses))[: self.examples]


def ctc_eval(run_dir: Path, data: Path, seeds: list[int], pretrained: bool = True,
             settings: CTCSettings = CTCSettings(), device: torch.device | str = "cpu") -> Iterator[FinetuneResult]:
    """Fine-tune the model with a character head under CTC on synthetic sentences, through the
    shared ``finetune`` loop as ``settings`` say, selecting on validation CER; test on unseen
    voices saying unseen sentences and on real recordings of them. One result per seed, yielded as
    each finishes."""
    config, make = load_pretrained(run_dir, pretrained, device)
    cfg = settings.finetune_config()
    splits = {"train": load_split(data, "sentences-train"), "validation": load_split(data, "sentences-validation"),
              **{name: load_split(data, manifest) for name, manifest in CTC_TESTS.items()}}
    def frozen_features(seed: int) -> dict[str, Transcribed]:
        seed_everything(seed)  # an untrained feature extractor is drawn from the seed
        extractor = make()
        return {name: Transcribed(conv_features(extractor, rows), rows) for name, rows in splits.items()}

    # the trained extractor's features once; an untrained one's per seed (one at a time: ~0.1 GB
    # each), so the random-init row's spread covers the extractor's draw, as the probe's does
    trained = frozen_features(seeds[0]) if pretrained else None
    for seed in seeds:
        datasets = trained if trained is not None else frozen_features(seed)
        frames = [len(f) for f in datasets["train"].features]  # the sentences last 0.4-62 s: batch by length

        def build_recogniser(datasets=datasets, frames=frames) -> CTCModel:
            return CTCModel(make(), config.model.dim, settings.masking).fit_standardize(datasets["train"], frames)

        yield finetune(build_recogniser, datasets["train"], datasets["validation"],
                       {name: datasets[name] for name in CTC_TESTS}, _collate_transcripts, CTCObjective(), cfg, seed,
                       desc=f"CTC ({config.model.norm.kind}{'' if pretrained else ', random init'}) seed {seed}",
                       lengths=frames, device=device)
        del datasets, frames, build_recogniser  # the next seed's features are built without these held


# ---------------------------------------------------------------- the pretraining task on held-out speech

CONTRASTIVE_TESTS = {"unseen voices": ["sentences-test"], "real recordings": ["real-sentences-test", "real-keywords"]}


CONTRASTIVE_BATCH = 8
"""Recordings per batch of the contrastive eval."""


def contrastive_batches(rows: list[Utterance], crop: int,
                        size: int = CONTRASTIVE_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out recordings in batches of ``size`` as pretraining reads its own: by length, each
    batch cropped to its shortest (so the masker masks every recording as the config asks)."""
    rows = by_length(rows, crop)
    for start in range(0, len(rows), size):
        yield crop_to_shortest([AudioClip(r.path) for r in rows[start : start + size]], crop)


def contrastive_eval(run_dir: Path, data: Path, seeds: list[int], pretrained: bool = True,
                     device: torch.device | str = "cpu") -> Iterator[dict]:
    """The validation scores of pretraining (``pretraining_loss``'s extras: contrastive loss with
    every distractor kept, accuracy, perplexities) on held-out speech, once per seed of the masks
    and distractors. Speech the run never validated on (the real recordings) confirms what a
    setting chosen on the validation voices does. One result per seed, yielded as each finishes."""
    from tqdm.auto import tqdm

    config, make = load_pretrained(run_dir, pretrained, device)
    for seed in seeds:
        seed_everything(seed)
        model = make().eval()
        scores = {}
        for name, manifests in CONTRASTIVE_TESTS.items():
            # each recording once: a real keyword can also be a held-out prompt sentence
            rows = list({r.path: r for m in manifests for r in load_split(data, m)}.values())
            rows = [r for r in rows if r.num_samples >= masking_min_samples(config.model)]
            sums: dict[str, float] = {}
            with torch.no_grad():
                for batch in tqdm(contrastive_batches(rows, config.data.crop_samples), total=-(-len(rows) // CONTRASTIVE_BATCH),
                                  desc=f"contrastive, {name}", leave=False, dynamic_ncols=True):
                    _, extras = pretraining_loss(model, to_device(batch, device), config.loss)
                    for key, value in extras.items():  # weighted by utterances: a short last batch counts as its size
                        sums[key] = sums.get(key, 0.0) + value * len(batch[1])
            scores[name] = {k: v / len(rows) for k, v in sums.items() if k != "units"} | {"utterances": len(rows)}
        yield {"seed": seed, "test": scores}


@user_errors("dyt_wav2vec2.eval")
def main(argv: list[str] | None = None) -> dict:
    parser = CommandParser(prog="dyt_wav2vec2.eval", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=user_path, required=True, help="a pretraining run directory")
    parser.add_argument("--evals", action=DistinctValues, nargs="+", choices=EVALS, default=list(EVALS),
                        help="default: all four, as dyt-wav2vec2-compare runs them")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the run's model untrained (same config, seeds and budget): the baseline row")
    parser.add_argument("--seeds", action=DistinctValues, type=SEED.arg(int), nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=user_path, default=None, help="built-in speech data dir (default: built on demand)")
    keyword_options = add_keyword_arguments(parser)
    ctc_options = [*add_ctc_arguments(parser),
                   parser.add_argument("--ctc-mask-time", type=float, default=CTCSettings.masking.time_prob,
                                       help="CTC fine-tuning: masked share of frames, at most (spans of 10 frames)"),
                   parser.add_argument("--ctc-mask-channels", type=float, default=CTCSettings.masking.channel_prob,
                                       help="CTC fine-tuning: zeroed share of channels, at most (spans of 8)")]
    add_device_argument(parser)
    parser.add_argument("--out", type=output_file,
                        help="keep the per-seed results here (JSON), as each seed finishes; run again with the same "
                             "--out, the seeds it holds for the same settings are read back")
    args = parser.parse_args(argv)
    check_eval_options(parser, argv, args, keyword_options, ctc_options)
    try:
        masking = CTCMasking(time_prob=args.ctc_mask_time, channel_prob=args.ctc_mask_channels)
    except ValueError as error:
        parser.error(str(error))
    if args.data is not None and not any(args.data.glob("*.tsv")):
        found = ("a file, not a folder" if args.data.is_file() else "no .tsv manifests there" if args.data.is_dir()
                 else "no such folder")
        parser.error(f"--data {args.data}: {found}; give the folder `python -m dyt_wav2vec2.speech --out DIR` built, "
                     "or leave --data out")
    check_run(args.run, weights=not args.random_init)  # before any data is built
    if args.out:
        read_eval_out(args.out)  # a file that is not an eval's results is refused before any work
    config = load_config(Wav2Vec2PretrainConfig, args.run / "config.yaml", check_files=False)
    budget = resolve_ctc_budget(args, config.eval, args.run / "config.yaml")
    if "ctc" in args.evals:
        print(budget, flush=True)
    # the speech the run was pretrained beside, at its size (a default-sized build would rewrite it)
    data = args.data or builtin_speech(config.data)
    check_eval_data(data, args.evals)
    ctc = CTCSettings(steps=args.ctc_steps, lr=args.ctc_lr, schedule=args.ctc_schedule, masking=masking)
    pretrained = not args.random_init
    common = {"run_config": config_digest(args.run), "pretrained": pretrained, "speech": speech_identity(data)}
    pinned = contextlib.nullcontext()
    if pretrained:
        common["checkpoint_step"], pinned = pin_evaluated_checkpoint(args.run, config.train.steps)
    stored = {name: name if pretrained else f"{name}-random-init" for name in args.evals}  # both may share one --out
    settings = {name: {**common, **eval_settings(name, args.steps, ctc)} for name in args.evals}
    if args.out:  # every eval's settings against the file's, before the first eval computes
        read_eval_out(args.out, {stored[name]: settings[name] for name in args.evals})
    print(f"evals on {args.device}", flush=True)
    results: dict[str, list[dict]] = {}
    with pinned:
        for name in args.evals:
            def compute(missing: list[int], name: str = name) -> Iterator[dict]:
                rows = eval_results(name, args.run, data, missing, args.steps, ctc, pretrained, args.device)
                for seed, row in zip(missing, rows, strict=True):
                    print(f"{name} seed {seed}: " + ", ".join(
                        f"{metric} on {test} {values[0]:.3f}" for metric, cells in headline(name, [row]).items()
                        for test, values in cells.items()), flush=True)
                    yield {**row, "run": str(args.run)}

            results[name] = (eval_out_seeds(args.out, stored[name], settings[name], args.seeds, compute, args.device)
                             if args.out else list(compute(args.seeds)))
    for name, rows in results.items():
        for metric, cells in headline(name, rows).items():
            for test, values in cells.items():
                print(f"{name} {metric} on {test}: {mean_std(values)}")
    return results


EVALS = ["contrastive", "probe", "finetune", "ctc"]
HEADLINE = {"contrastive": ["contrastive_accuracy", "contrastive_kept"], "probe": ["accuracy"],
            "finetune": ["accuracy"], "ctc": ["cer", "wer"]}
"""The metrics each eval's tables show (the first is its main one)."""


def headline(name: str, rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """metric -> test set -> one value per seed, from one eval's per-seed results."""
    return {m: {t: [r["test"][t][m] for r in rows] for t in rows[0]["test"]} for m in HEADLINE[name]}


def add_ctc_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The CTC eval's budget, rate and schedule (``CTCSettings``), for this CLI and the compare's."""
    return [
        parser.add_argument("--ctc-steps", type=AT_LEAST_ONE.arg(int), default=None,
                            help="CTC fine-tuning steps per seed (default: the config's eval.ctc_steps, "
                                 f"{SpeechEvalConfig.ctc_steps} unless it sets one; 8000 in recipes/wav2vec2/small.yaml)"),
        parser.add_argument("--ctc-lr", type=POSITIVE.arg(float), default=None,
                            help="CTC fine-tuning peak learning rate (default: the config's eval.ctc_lr, "
                                 f"{SpeechEvalConfig.ctc_lr:g} unless it sets one; 2e-3 in recipes/wav2vec2/small.yaml)"),
        parser.add_argument("--ctc-schedule", choices=SCHEDULES, default=CTCSettings.schedule,
                            help="CTC fine-tuning learning-rate schedule"),
    ]


def resolve_ctc_budget(args: argparse.Namespace, config: SpeechEvalConfig, config_file: Path,
                       config_label: str | None = None) -> str:
    """``--ctc-steps`` and ``--ctc-lr`` where given, else what the config (the run's, or the
    comparison's: ``config_file``, named ``config_label`` where overrides may have set it too) says
    for its model's size in its ``eval`` section: a small.yaml run evaluated without them took the
    tiny model's budget and rate. Returns the budget and where it came from, in one line."""
    given = [option for option, value in (("--ctc-steps", args.ctc_steps), ("--ctc-lr", args.ctc_lr))
             if value is not None]
    if args.ctc_steps is None:
        args.ctc_steps = config.ctc_steps
    if args.ctc_lr is None:
        args.ctc_lr = config.ctc_lr
    try:
        written = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError):  # read by load_config already: not this function's to say
        written = {"eval": None}
    if len(given) == 2:
        source = "--ctc-steps and --ctc-lr"
    elif isinstance(written, dict) and "eval" in written or config_label:
        source = ", ".join([*given, f"the eval section of {config_label or config_file}"])
    else:
        source = ", ".join([*given, f"the defaults, chosen for tiny.yaml: {config_file} has no eval section (a small.yaml "
                                    "run from before 2026-12-07 takes --ctc-steps 8000 --ctc-lr 2e-3)"])
    return f"CTC budget: {args.ctc_steps} steps at peak lr {args.ctc_lr:g}, {args.ctc_schedule} ({source})"


KEYWORD_STEPS = 150  # keyword fine-tuning steps per seed, in the comparisons and by itself alike


def check_eval_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None, args: argparse.Namespace,
                       keyword_options: list[argparse.Action], ctc_options: list[argparse.Action]) -> None:
    """Refuse an eval's option given where ``--evals`` leaves that eval out: it would change nothing,
    and the run would look as if it had."""
    idle = [*(keyword_options if not {"probe", "finetune"} & set(args.evals) else []),
            *(ctc_options if "ctc" not in args.evals else [])]
    if given := options_given(parser, argv, idle):
        parser.error(f"{', '.join(given)} set(s) an eval that --evals {' '.join(args.evals)} does not run: add the "
                     "eval to --evals, or drop the option")


def add_keyword_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The keyword evals' options, the same in ``dyt_wav2vec2.eval`` and ``dyt-wav2vec2-compare``."""
    return [parser.add_argument("--steps", type=AT_LEAST_ONE.arg(int), default=KEYWORD_STEPS,
                                help=f"keyword fine-tuning (probe, finetune) steps per seed (default {KEYWORD_STEPS})")]


def eval_settings(name: str, steps: int, ctc: CTCSettings) -> dict:
    """What one eval's results depend on besides the model and the speech (its budget), kept with
    its stored results by the compare and by ``--out``."""
    return {"contrastive": {}, "probe": {"steps": steps}, "finetune": {"steps": steps}, "ctc": {"ctc": asdict(ctc)}}[name]


KEYWORD_MANIFESTS = ["keywords-train", "keywords-validation", *KEYWORD_TESTS.values()]
CTC_MANIFESTS = ["sentences-train", "sentences-validation", *CTC_TESTS.values()]
EVAL_MANIFESTS = {"contrastive": sorted({m for names in CONTRASTIVE_TESTS.values() for m in names}),
                  "probe": KEYWORD_MANIFESTS, "finetune": KEYWORD_MANIFESTS, "ctc": CTC_MANIFESTS}
"""The manifests (``<name>.tsv``, with ``.wrd`` transcripts where scored) each eval reads."""


def check_eval_data(data: Path, evals: Sequence[str]) -> None:
    """Every manifest ``evals`` read, its audio files and the transcripts they score, before any eval
    runs (an AudioError naming the line): a keyword that is not one of :data:`KEYWORDS`, or a CTC
    transcript with a character outside :data:`CHARACTERS` (upper case, a digit), was a ValueError
    after minutes of work, the CTC test set's after the whole fine-tune."""
    scored = {}  # manifest -> the first eval that scores its transcripts (None: read for its audio alone)
    for name in evals:
        for manifest in EVAL_MANIFESTS[name]:
            if scored.get(manifest) is None:
                scored[manifest] = None if name == "contrastive" else name
    for manifest, name in scored.items():  # each manifest read once, whichever evals read it
        rows = load_split(data, manifest)
        if name is None:
            continue
        texts = data / f"{manifest}.wrd"
        if not texts.is_file():
            raise AudioError(f"{texts}: no such transcripts file, which the {name} eval scores against")
        for line, row in enumerate(rows, start=1):
            if name != "ctc" and row.text not in KEYWORDS:
                raise AudioError(f"{texts}:{line}: {row.text!r} is not one of the {len(KEYWORDS)} keywords the "
                                 f"{name} eval classifies ({', '.join(KEYWORDS[:3])}, ..., {KEYWORDS[-1]})")
            if name == "ctc" and (odd := next((c for c in row.text if c not in CHARACTERS[1:]), None)):
                raise AudioError(f"{texts}:{line}: {row.text!r} holds {odd!r}, outside the CTC eval's characters "
                                 "(a-z, space, apostrophe): give transcripts in lower case, numbers spelled out")


def eval_results(name: str, run_dir: Path, data: Path, seeds: list[int], steps: int,
                 ctc: CTCSettings = CTCSettings(), pretrained: bool = True,
                 device: torch.device | str = "cpu") -> Iterator[dict]:
    """One eval's JSON result per seed, yielded as each finishes (what the compare stores)."""
    if name == "contrastive":
        yield from contrastive_eval(run_dir, data, seeds, pretrained, device)
    elif name == "ctc":
        yield from map(asdict, ctc_eval(run_dir, data, seeds, pretrained, ctc, device))
    else:
        lr = 1e-2 if name == "probe" else 5e-4
        cfg = FinetuneConfig(lr=lr, batch_size=32, epochs=100, max_steps=steps, eval_every=max(1, steps // 8),
                             patience=4)
        yield from map(asdict, keyword_eval(run_dir, data, name, cfg, seeds, pretrained, device))


if __name__ == "__main__":
    main()
