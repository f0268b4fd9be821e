"""dyt-wav2vec2: every LayerNorm swapped (and back), masking/quantizer shapes, the loss falls on
real synthetic speech, manifests and bad audio, eval metrics, a 2-rank run with resume."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from fairseq2.nn import BatchLayout

from dyt import DyT, NormConfig, convert_norms, iter_norms
from dyt.train import load_config, read_metrics
from dyt.train.config import resume_changes
from dyt.train.distributed import free_port
from dyt.train.finetune import Standardize, classification_metrics, confusion_matrix
from dyt_wav2vec2 import audio
from dyt_wav2vec2.audio import (
    AudioClip,
    AudioError,
    Utterance,
    inspect_audio,
    load_audio,
    manifest_from_folder,
    read_manifest,
    shared_recordings,
    write_manifest,
)
from dyt_wav2vec2.eval import (
    CTC_TESTS,
    KEYWORD_TESTS,
    CTCMasking,
    CTCModel,
    FinetuneMasker,
    KeywordClassifier,
    LabeledAudio,
    Transcribed,
    _collate_labels,
    character_error_rate,
    contrastive_batches,
    conv_features,
    greedy_decode,
    headline,
    pooled,
    standardized,
    text_to_ids,
    word_error_rate,
)
from dyt_wav2vec2.model import POST_EXTRACT, build_wav2vec2, encode
from dyt_wav2vec2.speech import KEYWORDS, normalize_text, package_root, spoken_text, synthesize, voice_splits
from dyt_wav2vec2.task import (
    SpeechEvalConfig,
    Wav2Vec2PretrainConfig,
    Wav2Vec2PretrainTask,
    by_length,
    check_audio,
    crop_and_batch,
    crop_to_shortest,
    masking_min_samples,
    pretraining_loss,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "wav2vec2" / "tiny.yaml"


def _config(*overrides):
    return load_config(Wav2Vec2PretrainConfig, TINY, list(overrides))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """A few real synthetic utterances: espeak-ng and flite voices from the Debian packages."""
    root, out = package_root(), tmp_path_factory.mktemp("speech")
    voices = voice_splits(root)
    import random

    rng = random.Random(0)
    texts = ["please enter your account number", "the party you are calling is not available", "alpha bravo seven"]
    rows = [synthesize(root, voice, text, out / f"{i}.wav", rng)
            for i, (voice, text) in enumerate(zip(voices["train"][:2] + ["flite:kal"], texts))]
    return out, rows


# ---------------------------------------------------------------- model and the norm switch

@pytest.mark.parametrize("norm_order", ["pre", "post"])
def test_norm_scope_all_replaces_every_layernorm_and_back(norm_order):
    layernorm = build_wav2vec2(_config(f"model.norm_order={norm_order}", "model.norm_scope=all").model)
    dyt = build_wav2vec2(_config(f"model.norm_order={norm_order}", "model.norm=dyt", "model.norm_scope=all").model)
    before = list(iter_norms(layernorm))
    after = list(iter_norms(dyt))
    assert len(before) == len(after) > 2 * 2  # conv norms + frontend + 2 per layer (+ final with pre-LN)
    assert [p for p, _, _ in before] == [p for p, _, _ in after]
    assert all(isinstance(m, DyT) for _, m, _ in after)
    assert not [m for m in dyt.modules() if "LayerNorm" in type(m).__name__ or isinstance(m, torch.nn.GroupNorm)]
    # alpha0 0.5 (the paper's) everywhere but the DyT over the conv features (role input: 2)
    assert all(m.alpha_init == (2.0 if p == POST_EXTRACT else 0.5) and m.bias is not None for p, m, _ in after)
    back = convert_norms(dyt, NormConfig(kind="layernorm"))
    assert len(back.replaced) == len(after)
    assert not [m for m in dyt.modules() if isinstance(m, DyT)]


@pytest.mark.parametrize("recipe", ["tiny", "base", "large"])
def test_default_norm_scope_is_the_papers(recipe):
    """Post-extraction norm and every Transformer norm become DyT; the conv feature extractor keeps
    the baseline's norms (GroupNorm for Base, over real frames only, per-conv LayerNorms for Large
    and tiny). Every DyT
    takes the config's settings (bias, alpha0), the frontend's included."""
    overrides = ["model.norm=dyt", "model.norm.bias=false", "model.norm.alpha_init.default=0.7",
                 "model.norm.alpha_init.input=1.5"]
    if recipe != "tiny":
        overrides += ["model.layers=2", "model.dim=64", "model.heads=4", "model.ffn_dim=128"]
    cfg = load_config(Wav2Vec2PretrainConfig, ROOT / "recipes" / "wav2vec2" / f"{recipe}.yaml", overrides)
    norms = {path: type(module).__name__ for path, module, _ in iter_norms(build_wav2vec2(cfg.model))}
    extractor = {p: t for p, t in norms.items() if p.startswith("encoder_frontend.feature_extractor.")}
    converted = {p: t for p, t in norms.items() if p not in extractor}
    baseline = {"base": {"RealFramesGroupNorm"}}.get(recipe, {"StandardLayerNorm"})
    assert extractor and set(extractor.values()) == baseline, extractor
    assert len(extractor) == (1 if recipe == "base" else 7)
    want = {"encoder_frontend.post_extract_layer_norm"} | {f"encoder.layers.{i}.{n}_layer_norm"
                                                           for i in range(cfg.model.layers) for n in ("self_attn", "ffn")}
    want |= {"encoder_frontend.layer_norm"} if cfg.model.norm_order == "post" else {"encoder.layer_norm"}
    assert set(converted) == want and set(converted.values()) == {"DyT"}, converted
    dyts = {p: m for p, m, _ in iter_norms(build_wav2vec2(cfg.model)) if isinstance(m, DyT)}
    assert set(dyts) == want and all(m.bias is None for m in dyts.values())
    assert {p: m.alpha_init for p, m in dyts.items()} == {p: 1.5 if p == POST_EXTRACT else 0.7 for p in want}


def test_contrastive_metrics_score_a_collapsed_quantizer_at_chance():
    """fairseq2 drops distractors equal to the target (-inf logits): a model whose targets are all
    one code then scores a low loss. Kept as ties, it scores ln(K + 1) and no accuracy."""
    from dyt_wav2vec2.task import contrastive_metrics

    collapsed = torch.zeros(2, 5, 21)
    collapsed[..., 1:] = -torch.inf
    metrics = contrastive_metrics(collapsed)
    assert metrics["contrastive_kept"] == pytest.approx(math.log(21))
    assert metrics["contrastive_accuracy"] == pytest.approx(1 / 21) and metrics["distractors_equal_target"] == 1.0
    logits = torch.tensor([[[3.0, 1.0, -torch.inf], [0.0, 2.0, 1.0]]])  # frame 1 right, frame 2 wrong
    metrics = contrastive_metrics(logits)
    want = (torch.nn.functional.cross_entropy(torch.tensor([[3.0, 1.0, 3.0], [0.0, 2.0, 1.0]]), torch.zeros(2, dtype=torch.long)))
    assert metrics["contrastive_kept"] == pytest.approx(want.item())
    assert metrics["contrastive_accuracy"] == pytest.approx(0.25)  # frame 1 ties its copy: first half the time
    assert metrics["distractors_equal_target"] == pytest.approx(0.25)
    metrics = contrastive_metrics(torch.tensor([[[3.0, 1.0, 2.0], [0.0, 2.0, 1.0]]]))
    assert metrics["contrastive_accuracy"] == 0.5 and metrics["distractors_equal_target"] == 0.0


def test_masking_and_quantizer_shapes():
    torch.manual_seed(0)
    cfg = _config()
    model = build_wav2vec2(cfg.model)
    waves = torch.randn(3, 32000)
    lengths = [32000, 24000, 16000]
    loss, out = model(waves, BatchLayout(waves.shape, seq_lens=lengths))
    batch, masked, candidates = out.logits.shape
    assert batch == 3 and candidates == cfg.model.distractors + 1
    assert out.num_targets == batch * masked
    assert out.temporal_mask.shape == (3, 99) and out.temporal_mask.sum() == out.num_targets
    assert out.quantizer_output.quantized_vectors.shape == (3, masked, cfg.model.quantized_dim)
    assert 1 <= out.quantizer_output.prob_perplexity <= cfg.model.codebooks * cfg.model.codebook_entries
    features, frames = encode(model.eval(), waves, torch.tensor(lengths))
    assert features.shape == (3, 99, cfg.model.dim) and frames.tolist() == [99, 74, 49]
    assert masking_min_samples(cfg.model) == (31 + 2) * 320


def test_conv_activations_on_contiguous_input_change_no_value_or_gradient():
    """The feature extractor's GELUs run on a contiguous copy (a speed fix, ContiguousGELU): the
    conv features and every gradient equal those of fairseq2's plain GELU up to float32 rounding
    (ATen's vectorised and strided GELU round differently)."""
    from dyt_wav2vec2.model import ContiguousGELU

    cfg = _config("model.conv_layer_norm=true")  # LayerNorm convs: the strided case
    waves = torch.randn(2, 8000)
    outputs = []
    for activation in (ContiguousGELU, torch.nn.GELU):
        torch.manual_seed(0)
        model = build_wav2vec2(cfg.model)
        extractor = model.encoder_frontend.feature_extractor
        assert all(isinstance(layer.activation, ContiguousGELU) for layer in extractor.layers)
        for layer in extractor.layers:
            layer.activation = activation()
        features, _ = extractor(waves, BatchLayout(waves.shape, seq_lens=[8000, 8000]))
        features.square().mean().backward()
        outputs.append((features.detach(), [p.grad.clone() for p in extractor.parameters()]))
    (ours, our_grads), (plain, plain_grads) = outputs
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)
    for ours_g, plain_g in zip(our_grads, plain_grads):
        torch.testing.assert_close(ours_g, plain_g, rtol=1e-4, atol=1e-5 * plain_g.abs().max().item())


@pytest.mark.parametrize("norm", ["layernorm", "dyt"])
def test_base_group_norm_features_do_not_depend_on_the_padding_of_their_batch(norm):
    """Base's first conv has a GroupNorm over time: an utterance's features must be the same alone
    and padded in a batch beside a longer one (PyTorch's GroupNorm would take the padding into its
    statistics), and equal fairseq2's GroupNorm where nothing is padded."""
    from dyt_wav2vec2.model import RealFramesGroupNorm

    torch.manual_seed(0)
    model = build_wav2vec2(_config("model.conv_layer_norm=false", f"model.norm.kind={norm}").model).eval()
    group_norm = model.encoder_frontend.feature_extractor.layers[0].group_norm
    assert isinstance(group_norm, RealFramesGroupNorm)
    with torch.no_grad():
        group_norm.weight.uniform_(0.5, 1.5), group_norm.bias.uniform_(-0.5, 0.5)
    short, long = torch.randn(1, 12000), torch.randn(1, 32000)
    batch = torch.zeros(2, 32000)
    batch[0, :12000], batch[1] = short[0], long[0]
    with torch.no_grad():
        alone, frames = encode(model, short, torch.tensor([12000]))
        together, batch_frames = encode(model, batch, torch.tensor([12000, 32000]))
        long_alone, _ = encode(model, long, torch.tensor([32000]))
        conv = torch.randn(2, group_norm.num_channels, 50)
        group_norm.real_frames = None
        plain = torch.nn.functional.group_norm(conv, group_norm.num_groups, group_norm.weight, group_norm.bias,
                                               group_norm.eps)
        torch.testing.assert_close(group_norm(conv), plain)
        group_norm.real_frames = [30, 50]
        torch.testing.assert_close(group_norm(conv)[1], plain[1])
        torch.testing.assert_close(group_norm(conv)[0, :, :30], torch.nn.functional.group_norm(
            conv[:1, :, :30], group_norm.num_groups, group_norm.weight, group_norm.bias, group_norm.eps)[0])
        group_norm.real_frames = [0, 50]  # an utterance shorter than the first conv's kernel: zeros, not NaN
        assert group_norm(conv)[0].eq(0).all() and group_norm(conv)[1].isfinite().all()
        group_norm.real_frames = None
    assert batch_frames.tolist() == [frames.item(), 99] and group_norm.real_frames is None  # cleared after each forward
    torch.testing.assert_close(together[0, : frames.item()], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[1], long_alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "dyt"])
def test_loss_decreases_on_real_synthetic_speech(speech, norm):
    torch.manual_seed(0)
    cfg = _config(f"model.norm={norm}")
    model = build_wav2vec2(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    waves, lengths = crop_and_batch([load_audio(r.path) for r in speech[1]], crop=24000)
    losses = []
    for _ in range(12):
        torch.manual_seed(1)  # same masks and distractors each step: the loss must fall
        loss, out = model(waves, BatchLayout(waves.shape, seq_lens=lengths.tolist()))
        value = loss.aggregate / out.num_targets
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_pretraining_batch_masks_every_clip_as_the_config_asks(monkeypatch):
    """fairseq2's masker draws for every row as many spans as the batch's shortest row allows, so
    the pretraining batch (``crop_to_shortest``) holds clips of one length: each row gets the spans
    its own length allows, 0.65 / 10 x (frames - 1). A padded batch of three 2 s crops and one
    0.69 s clip gave each row the short clip's 2 spans instead of 6."""
    from fairseq2.nn.utils import mask

    cfg = _config()
    drawn = []

    def spy(row_lens, span_len, max_mask_prob, min_num_spans):
        indices = compute_spans(row_lens, span_len, max_mask_prob, min_num_spans)
        drawn.append((row_lens.tolist(), indices.shape[1] // span_len))
        return indices

    compute_spans = mask._compute_mask_spans
    monkeypatch.setattr(mask, "_compute_mask_spans", spy)
    torch.manual_seed(0)
    waves = [torch.randn(n) for n in (32_000, 40_000, 11_000, 32_000)]
    batch = crop_to_shortest(waves, cfg.data.crop_samples)
    assert batch[0].shape == (4, 11_000) and batch[1].tolist() == [11_000] * 4
    pretraining_loss(build_wav2vec2(cfg.model), batch, cfg.loss)
    ((row_lens, spans),) = drawn
    assert spans == int(cfg.model.mask_prob / cfg.model.mask_span * (row_lens[0] - 1)) >= 2
    assert row_lens == [row_lens[0]] * 4
    assert crop_to_shortest([waves[0], waves[1], waves[3]], cfg.data.crop_samples)[0].shape == (3, 32_000)


def test_pretraining_batches_clips_of_like_length():
    """The task gives the harness each training clip's cropped length (``train_lengths``: global
    batches of like length) and its validation clips by length, so that neighbouring positions,
    which the harness batches, are of like length."""
    rows = [Utterance(Path(f"/a/{i}.wav"), n) for i, n in enumerate([50_000, 9_000, 40_000, 12_000, 9_000])]
    assert [r.path.name for r in by_length(rows, 32_000)] == ["1.wav", "4.wav", "3.wav", "0.wav", "2.wav"]
    task = Wav2Vec2PretrainTask.__new__(Wav2Vec2PretrainTask)
    task.config, task.train_rows, task.validation_rows = _config(), rows, rows
    assert task.train_lengths() == [32_000, 9_000, 32_000, 12_000, 9_000]
    assert task.eval_dataset().rows == by_length(rows, 32_000)
    assert task.collate([torch.randn(20_000), torch.randn(15_000)])[1].tolist() == [15_000, 15_000]


def test_the_contrastive_eval_batches_recordings_as_pretraining_does(speech):
    folder, rows = speech
    crop = sorted(r.num_samples for r in rows)[1]  # one recording shorter, two cut to it
    batches = list(contrastive_batches(rows, crop, size=2))
    expected = [min(r.num_samples, crop) for r in by_length(rows, crop)]
    assert [len(lengths) for _, lengths in batches] == [len(expected[i : i + 2]) for i in range(0, len(expected), 2)]
    for (waves, lengths), start in zip(batches, range(0, len(expected), 2)):
        assert lengths.tolist() == [min(expected[start : start + 2])] * len(lengths) == [waves.shape[1]] * len(lengths)


# ---------------------------------------------------------------- audio inputs

def test_manifest_round_trip_and_folder(speech, tmp_path):
    folder, rows = speech
    manifest = tmp_path / "train.tsv"
    write_manifest(manifest, folder, rows)
    again = read_manifest(manifest, manifest.with_suffix(".wrd"))
    assert [(r.path, r.num_samples, r.text) for r in again] == [(r.path, r.num_samples, r.text) for r in rows]
    built = manifest_from_folder(folder, tmp_path / "all.tsv")
    assert sorted(r.num_samples for r in built) == sorted(r.num_samples for r in rows)
    assert load_audio(rows[0].path).numel() == rows[0].num_samples
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(rows[0].path, odd / "a\tb.wav")  # the manifest could not hold the name: refused, not written
    with pytest.raises(AudioError, match=r"a tab or line break in its name"):
        manifest_from_folder(odd, tmp_path / "odd.tsv")


def test_hf_audio_dataset_is_read_through_the_same_pipeline(speech, tmp_path, monkeypatch):
    import datasets

    from dyt_wav2vec2.task import audio_source

    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))
    folder, rows = speech
    saved = tmp_path / "hf"
    datasets.Dataset.from_dict({"audio": [str(r.path) for r in rows], "text": [r.text for r in rows]}).cast_column(
        "audio", datasets.Audio(decode=False)).save_to_disk(str(saved))
    loaded, problems = audio_source(saved)
    assert problems == [] and [u.text for u in loaded] == [r.text for r in rows]
    assert [u.num_samples for u in loaded] == [r.num_samples for r in rows]
    torch.testing.assert_close(load_audio(loaded[0].path), load_audio(rows[0].path), atol=1e-4, rtol=0)
    assert audio_source(saved)[0][0].path == loaded[0].path  # cached


def test_held_out_audio_that_is_training_audio_is_found_by_path_or_bytes(tmp_path, monkeypatch):
    """One recording in both splits: named by another spelling of its path, or copied under another
    name; same-length recordings with other samples are not the same recording."""
    rng = np.random.default_rng(0)
    for name in ("a.wav", "b.wav", "c.wav"):
        soundfile.write(tmp_path / name, rng.standard_normal(16000).astype(np.float32) * 0.1, 16000, subtype="PCM_16")
    (tmp_path / "sub").mkdir()
    shutil.copy(tmp_path / "c.wav", tmp_path / "sub" / "c-copy.wav")
    row = lambda path: Utterance(path, 16000)  # noqa: E731
    train = [row(tmp_path / "a.wav"), row(tmp_path / "sub" / "c-copy.wav")]
    held_out = [row(tmp_path / "sub" / ".." / "a.wav"), row(tmp_path / "b.wav"), row(tmp_path / "c.wav")]
    assert shared_recordings(train, held_out) == [(tmp_path / "sub" / ".." / "a.wav", tmp_path / "a.wav"),
                                                  (tmp_path / "c.wav", tmp_path / "sub" / "c-copy.wav")]
    assert shared_recordings(train, [row(tmp_path / "b.wav")]) == []
    checks, read = tmp_path / "checks", []
    monkeypatch.setattr(audio, "file_sha256", lambda path, digest=audio.file_sha256: read.append(path) or digest(path))
    assert shared_recordings(train, [row(tmp_path / "b.wav")], checks) == [] and len(read) == 3  # b and both trained
    assert shared_recordings(train, [row(tmp_path / "b.wav")], checks) == [] and len(read) == 3  # the marker: none read
    found = [(tmp_path / "c.wav", tmp_path / "sub" / "c-copy.wav")]
    assert shared_recordings(train, held_out[1:], checks) == found
    reads = len(read)  # another rank of the launch (or a relaunch) gets the stored pairs without a read
    assert shared_recordings(train, held_out[1:], checks) == found and len(read) == reads


def test_audio_checks_are_stored_for_every_rank_and_launch_until_a_file_changes(tmp_path, monkeypatch):
    """``check_audio`` with a results folder: the first call opens every file, a second (another rank
    of the launch, a relaunch) opens only the one that failed (a failure may have passed) and keeps
    the same rows and reasons; a rewritten file is checked anew, and a failure that has passed is
    good again; a folder that cannot be written only costs the reads."""
    rng = np.random.default_rng(0)
    for name, samples in (("a.wav", 16000), ("b.wav", 12000)):
        soundfile.write(tmp_path / name, rng.normal(0, 0.1, samples).astype(np.float32), 16000, subtype="PCM_16")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really audio")
    rows = [Utterance(tmp_path / name, 1) for name in ("a.wav", "b.wav", "bad.wav")]
    opened, failing = [], {tmp_path / "a.wav"}  # a.wav's first read fails, as on a file server's error

    def inspect(path, inspect=audio.inspect_audio):
        opened.append(path.name)
        if path in failing:
            failing.discard(path)
            raise AudioError(f"{path}: unreadable audio (Input/output error)")
        return inspect(path)

    monkeypatch.setattr(audio, "inspect_audio", inspect)
    checks = tmp_path / "checks"
    assert [r.path.name for r in check_audio(rows, 0.7, 1000, "training audio", checks)] == ["b.wav"]
    assert opened == ["a.wav", "b.wav", "bad.wav"]
    first = check_audio(rows, 0.5, 1000, "training audio", checks)  # another rank, a relaunch
    assert [(r.path.name, r.num_samples) for r in first] == [("a.wav", 16000), ("b.wav", 12000)]
    assert opened[3:] == ["a.wav", "bad.wav"]  # the stored failures only
    with pytest.raises(AudioError, match="1 of 3 files are bad .*bad.wav: unreadable audio"):
        check_audio(rows, 0.0, 1000, "training audio", checks)
    soundfile.write(tmp_path / "b.wav", np.zeros(8000, dtype=np.float32), 16000, subtype="PCM_16")
    del opened[:]
    assert [r.num_samples for r in check_audio(rows, 0.5, 1000, "training audio", checks)] == [16000, 8000]
    assert opened == ["a.wav", "b.wav", "bad.wav"]
    (tmp_path / "file").write_text("")
    assert check_audio(rows, 0.5, 1000, "training audio", tmp_path / "file" / "checks") == check_audio(rows, 0.5, 1000, "t")


def _long_recordings(speech, folder: Path) -> dict[str, Path]:
    """The fixture's utterances end to end, three times over (~15 s), written as each kind of file a
    clip reads differently: 16 kHz WAV (16-bit and float) and FLAC, read a span at a time; 22.05 kHz
    WAV (resampled) and 16 kHz Ogg Vorbis (not counted exactly in its header), read whole."""
    import torchaudio

    long = torch.cat([load_audio(r.path) for r in speech[1]] * 3)
    writes = {"pcm.wav": (long, 16000, {"subtype": "PCM_16"}), "float.wav": (long, 16000, {"subtype": "FLOAT"}),
              "pcm.flac": (long, 16000, {"format": "FLAC", "subtype": "PCM_16"}),
              "low.wav": (torchaudio.functional.resample(long, 16000, 22050), 22050, {"subtype": "PCM_16"}),
              "vorbis.ogg": (long, 16000, {"format": "OGG", "subtype": "VORBIS"})}
    for name, (wave, rate, kind) in writes.items():
        soundfile.write(folder / name, wave.numpy(), rate, **kind)
    return {name: folder / name for name in writes}


def test_clips_batch_as_their_loaded_waveforms_and_a_16khz_wav_or_flac_is_read_for_its_crop_alone(
        speech, tmp_path, monkeypatch):
    """Batches of clips against batches of the loaded waveforms under the same seed, each file at
    each place: the same tensors; then which files were decoded whole and how many frames were read."""
    paths = _long_recordings(speech, tmp_path)
    names = list(paths)
    for crop in (8000, 10**9):  # a crop of each, and each whole
        for first in range(len(names)):  # each file once the batch's shortest, and at each place in it
            order = names[first:] + names[:first]
            torch.manual_seed(crop + first)
            loaded = crop_to_shortest([load_audio(paths[n]) for n in order], crop)
            torch.manual_seed(crop + first)
            clipped = crop_to_shortest([AudioClip(paths[n]) for n in order], crop)
            assert torch.equal(loaded[0], clipped[0]) and torch.equal(loaded[1], clipped[1]), (crop, order)
    decoded, frames_read = [], []
    monkeypatch.setattr(audio, "load_audio", lambda path, name=None: decoded.append(path.name) or load_audio(path))
    read = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read",
                        lambda self, frames=-1, *a, **k: frames_read.append((Path(self.name).name, frames)) or
                        read(self, frames, *a, **k))
    batch, lengths = crop_and_batch([AudioClip(paths[n]) for n in names], 8000)
    assert lengths.tolist() == [8000] * len(names)
    assert sorted(decoded) == ["low.wav", "vorbis.ogg"]  # resampled, and a count the header estimates
    whole = {name: soundfile.info(paths[name]).frames for name in ("low.wav", "vorbis.ogg")}
    assert sorted(frames_read) == sorted([("float.wav", 8000), ("pcm.flac", 8000), ("pcm.wav", 8000), *whole.items()])


def _every_subtype(folder: Path, wave: np.ndarray, kinds: tuple[str, ...]) -> list[Path]:
    """``wave`` written at 16 kHz in every subtype libsndfile writes in each of ``kinds``
    (``{kind}-{subtype}.wav`` / ``.w64`` / ``.aiff`` / ``.flac``)."""
    written = []
    for kind in kinds:
        for subtype in soundfile.available_subtypes(kind):
            path = folder / f"{kind}-{subtype}.{ {'FLAC': 'flac', 'AIFF': 'aiff', 'W64': 'w64'}.get(kind, 'wav')}"
            try:
                soundfile.write(path, wave, 16000, format=kind, subtype=subtype)
            except (RuntimeError, TypeError, ValueError):  # a subtype libsndfile lists but cannot write
                continue
            written.append(path)
    return written


def test_a_clip_of_every_wav_aiff_and_flac_subtype_batches_as_its_loaded_waveform(speech, tmp_path, monkeypatch):
    """Every subtype libsndfile writes in the containers a clip may read by spans (WAV, WAVEX, RF64,
    W64, AIFF, FLAC), 16 kHz: the same crops as the whole file's, read by spans where libsndfile can
    seek in the file and whole where it cannot (GSM 6.10, G.721, NMS ADPCM: a seek there fails even
    at 0)."""
    wave = torch.cat([load_audio(r.path) for r in speech[1]])[:60000].numpy()
    decoded = []
    monkeypatch.setattr(audio, "load_audio", lambda path, name=None: decoded.append(path.name) or load_audio(path))
    written, unseekable = _every_subtype(tmp_path, wave, ("WAV", "WAVEX", "RF64", "W64", "AIFF", "FLAC")), set()
    for path in written:
        with soundfile.SoundFile(path) as opened:
            if not opened.seekable():
                unseekable.add(path.name)
    assert len(written) >= 20 and {"WAV-PCM_24.wav", "AIFF-ULAW.aiff", "FLAC-PCM_16.flac"} <= {p.name for p in written}
    unreadable = []
    for path in written:
        try:
            load_audio(path)
        except AudioError:  # libsndfile writes DWVW AIFF that it cannot read back: the clip refuses it too
            unreadable.append(path.name)
            with pytest.raises(AudioError, match=f"{path.name}: unreadable audio"):
                crop_and_batch([AudioClip(path)], 7000)
            continue
        for crop in (7000, 10**9):
            torch.manual_seed(crop)
            expected = crop_and_batch([load_audio(path)], crop)
            torch.manual_seed(crop)
            got = crop_and_batch([AudioClip(path)], crop)
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1]), (path.name, crop)
    assert sorted(set(decoded) - set(unreadable)) == sorted(unseekable - set(unreadable)), unreadable
    assert len(unreadable) < 5


def test_every_wav_subtype_is_checked_as_training_reads_it_and_refused_cut_in_half(tmp_path):
    """The start-up check of every WAV / WAVEX subtype libsndfile writes: a whole file counts the
    samples training reads (GSM 6.10, G.721 and NMS ADPCM too, which libsndfile cannot seek in and
    which were refused as truncated), and a file cut in half is refused as truncated: by its header's
    frames where the data holds whole frames, by its data chunk's bytes for block-coded ones (ADPCM
    cut in half had passed as a shorter file)."""
    wave = (0.3 * np.sin(np.arange(60000) / 10)).astype(np.float32)
    written = _every_subtype(tmp_path, wave, ("WAV", "WAVEX"))
    for path in written:
        cut = path.with_name(f"cut-{path.name}")
        cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        for decode in (False, True):
            assert inspect_audio(path, decode=decode) == load_audio(path).numel(), (path.name, decode)
            with pytest.raises(AudioError, match=f"{cut.name}: truncated: the header (promises|declares)"):
                inspect_audio(cut, decode=decode)
    assert len(written) >= 12


def test_a_block_coded_wav_is_judged_truncated_by_its_bytes_and_a_flac_of_unknown_length_refused(tmp_path):
    """An IMA ADPCM WAV: a fact chunk left open (0xFFFFFFFF) or overstating the count does not make
    a whole file truncated; 10 bytes cut (libsndfile counts the partial last block whole), or half
    of one without a fact chunk, do. A FLAC whose header leaves its length open, which soundfile
    cannot read, is one line, not a traceback."""
    wave = (0.3 * np.sin(np.arange(60000) / 10)).astype(np.float32)
    soundfile.write(tmp_path / "ima.wav", wave, 16000, format="WAV", subtype="IMA_ADPCM")
    whole = (tmp_path / "ima.wav").read_bytes()
    fact = whole.index(b"fact") + 8
    variants = {"open.wav": whole[:fact] + b"\xff" * 4 + whole[fact + 4 :],
                "overstated.wav": whole[:fact] + (70000).to_bytes(4, "little") + whole[fact + 4 :],
                "cut-10.wav": whole[:-10], "no-fact-cut.wav": (whole[: fact - 8] + b"junk" + whole[fact - 4 :])[: len(whole) // 2]}
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
    for decode in (False, True):
        for name in ("ima.wav", "open.wav", "overstated.wav"):
            assert inspect_audio(tmp_path / name, decode=decode) == load_audio(tmp_path / name).numel() >= 60000
        with pytest.raises(AudioError, match=r"cut-10.wav: truncated: the header declares 10 more bytes of coded audio "
                                             r"than the file holds \(of 6000\d samples in all\)"):
            inspect_audio(tmp_path / "cut-10.wav", decode=decode)
        with pytest.raises(AudioError, match=r"no-fact-cut.wav: truncated: the header declares \d+ more bytes of coded "
                                             r"audio than the file holds; re-export"):
            inspect_audio(tmp_path / "no-fact-cut.wav", decode=decode)
    soundfile.write(tmp_path / "a.flac", wave, 16000, subtype="PCM_16")
    flac = bytearray((tmp_path / "a.flac").read_bytes())
    fields = int.from_bytes(flac[18:26], "big")  # STREAMINFO: rate, channels, bits, then 36 bits of total samples
    flac[18:26] = (fields & ~((1 << 36) - 1)).to_bytes(8, "big")
    (tmp_path / "open.flac").write_bytes(bytes(flac))
    for read in (lambda p: inspect_audio(p), lambda p: inspect_audio(p, decode=True), load_audio,
                 lambda p: AudioClip(p).numel()):
        with pytest.raises(AudioError, match=r"open.flac: unreadable audio \(its header does not give its length"):
            read(tmp_path / "open.flac")


def test_the_audio_crops_script_runs(speech, tmp_path):
    """scripts/bench_audio_crops.py on a short FLAC: both ways timed, their batches checked equal."""
    soundfile.write(tmp_path / "a.flac", torch.cat([load_audio(r.path) for r in speech[1]]).numpy(), 16000,
                    subtype="PCM_16")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_audio_crops.py"), "--file", str(tmp_path / "a.flac"),
                           "--clips", "2", "--crop", "4000", "--rounds", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the batches equal" in done.stdout and "decoded whole" in done.stdout and "read for the crop" in done.stdout


def test_a_clip_refuses_nan_samples_where_it_reads_and_a_file_shortened_since_it_was_counted(tmp_path):
    noisy = np.zeros(48000, dtype=np.float32)
    noisy[[30007, 30090]] = [np.nan, np.inf]
    soundfile.write(tmp_path / "nan.wav", noisy, 16000, subtype="FLOAT")
    clip = AudioClip(tmp_path / "nan.wav")
    assert clip.numel() == 48000 and torch.equal(clip.span(0, 30000), torch.zeros(30000))  # NaN not read: no error
    with pytest.raises(AudioError, match=r"nan.wav: 2 of samples 30000 to 30999 are NaN or infinite "
                                         r"\(first at sample 30007\)"):
        clip.span(30000, 1000)
    soundfile.write(tmp_path / "nan.wav", noisy[:20000], 16000, subtype="FLOAT")  # changed since it was counted
    with pytest.raises(AudioError, match=r"nan.wav: 48000 samples when counted, but samples 19000 to 26999 read "
                                         r"1000: changed during the run\? Re-export or remove the file"):
        clip.span(19000, 8000)
    soundfile.write(tmp_path / "stereo.wav", np.zeros((16000, 2), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="stereo.wav: 2 channels"):
        AudioClip(tmp_path / "stereo.wav").numel()
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really audio")
    with pytest.raises(AudioError, match="broken.wav: unreadable audio"):
        AudioClip(tmp_path / "broken.wav").numel()


def test_bad_audio_and_manifest_rows_are_named(speech, tmp_path):
    folder, rows = speech
    (tmp_path / "stereo.wav").parent.mkdir(exist_ok=True)
    soundfile.write(tmp_path / "stereo.wav", np.zeros((16000, 2), dtype=np.float32), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really audio")
    soundfile.write(tmp_path / "empty.wav", np.zeros((0,), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="stereo.wav: 2 channels"):
        load_audio(tmp_path / "stereo.wav")
    with pytest.raises(AudioError, match="broken.wav: unreadable audio"):
        load_audio(tmp_path / "broken.wav")
    with pytest.raises(AudioError, match="empty.wav: empty audio"):
        load_audio(tmp_path / "empty.wav")
    noisy = np.zeros(16000, dtype=np.float32)
    noisy[[7, 90]] = [np.nan, np.inf]
    soundfile.write(tmp_path / "nan.wav", noisy, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan.wav: 2 samples are NaN or infinite \(first at sample 7\)"):
        load_audio(tmp_path / "nan.wav")
    with pytest.raises(AudioError, match=r"nan.wav: 2 of samples 0 to 15999 are NaN or infinite \(first at sample 7\)"):
        inspect_audio(tmp_path / "nan.wav", decode=True)
    (tmp_path / "m.tsv").write_text(f"{folder}\n{rows[0].path.name}\t100\nmissing.wav\t100\n")
    with pytest.raises(AudioError, match=r"m.tsv:3: audio file .*missing.wav does not exist"):
        read_manifest(tmp_path / "m.tsv")
    (tmp_path / "m.tsv").write_text(f"{folder}\n{rows[0].path.name} 100\n")
    with pytest.raises(AudioError, match=r"m.tsv:2: expected 'relative/path<TAB>num_samples'"):
        read_manifest(tmp_path / "m.tsv")
    good = [Utterance(r.path, r.num_samples) for r in rows]
    bad = [Utterance(tmp_path / "broken.wav", 10), Utterance(tmp_path / "stereo.wav", 16000)]
    with pytest.raises(AudioError, match="2 of 5 files are bad"):
        check_audio(good + bad, 0.2, 1, "training audio")
    assert len(check_audio(good + bad, 0.5, 1, "training audio")) == 3
    with pytest.raises(AudioError, match=r"training audio: no audio files listed"):  # a manifest of its root line alone
        check_audio([], 0.5, 1, "training audio")


def test_truncated_and_too_short_audio_are_named_never_dropped_silently(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name, samples in (("a.wav", 16000), ("b.wav", 16000), ("short.wav", 800)):
        soundfile.write(tmp_path / name, rng.normal(0, 0.1, samples).astype(np.float32), 16000, subtype="PCM_16")
    (tmp_path / "trunc.wav").write_bytes((tmp_path / "a.wav").read_bytes()[: 44 + 16])  # promises 16000, holds 8
    assert inspect_audio(tmp_path / "a.wav") == inspect_audio(tmp_path / "a.wav", decode=True) == 16000
    for decode in (False, True):
        with pytest.raises(AudioError, match="trunc.wav: truncated: the header promises 16000 samples, the file holds 8"):
            inspect_audio(tmp_path / "trunc.wav", decode=decode)
    rows = [Utterance(tmp_path / name, 16000) for name in ("a.wav", "b.wav", "short.wav", "trunc.wav")]
    with pytest.raises(AudioError, match=r"training audio: 1 of 4 files are bad .*trunc.wav: truncated"):
        check_audio(rows, 0.0, 1000, "training audio")
    assert [r.path.name for r in check_audio(rows, 0.5, 1000, "training audio")] == ["a.wav", "b.wav"]
    # each row kept with what its file holds (batching by length reads it), not what a manifest said
    assert check_audio([Utterance(tmp_path / "a.wav", 5)], 0.0, 1000, "training audio")[0].num_samples == 16000
    out = capsys.readouterr().out
    assert "training audio: left out 1 bad file(s) of 4 (allowed: 50.0%)" in out and "trunc.wav: truncated" in out
    assert "training audio: left out 1 file(s) of 4 shorter than 1000 samples" in out and "short.wav" in out
    left_out = []
    built = manifest_from_folder(tmp_path, tmp_path / "m.tsv", on_bad=left_out.append)
    assert sorted(r.path.name for r in built) == ["a.wav", "b.wav", "short.wav"]
    assert len(left_out) == 1 and "trunc.wav: truncated" in str(left_out[0])
    assert "trunc.wav" not in (tmp_path / "m.tsv").read_text()
    with pytest.raises(AudioError, match="trunc.wav: truncated"):
        manifest_from_folder(tmp_path, tmp_path / "strict.tsv")
    assert not (tmp_path / "strict.tsv").exists()


# ---------------------------------------------------------------- eval metrics

def test_character_error_rate_on_hand_checked_strings():
    assert character_error_rate(["abc"], ["abc"]) == 0
    assert character_error_rate(["ab"], ["abc"]) == pytest.approx(1 / 3)  # one deletion
    assert character_error_rate(["the cot", "x"], ["the cat", "xy"]) == pytest.approx(2 / 9)  # a substitution, a deletion
    assert character_error_rate([""], ["two words"]) == 1.0


def test_headline_metrics_per_eval_and_test_set():
    ctc = [{"test": {"a": {"wer": 1.0, "cer": 0.4}, "b": {"wer": 0.5, "cer": 0.2}}},
           {"test": {"a": {"wer": 0.9, "cer": 0.3}, "b": {"wer": 0.7, "cer": 0.1}}}]
    assert headline("ctc", ctc) == {"cer": {"a": [0.4, 0.3], "b": [0.2, 0.1]}, "wer": {"a": [1.0, 0.9], "b": [0.5, 0.7]}}
    probe = [{"test": {"a": {"accuracy": 0.5, "mcc": 0.1}}}, {"test": {"a": {"accuracy": 0.25, "mcc": 0.0}}}]
    assert headline("probe", probe) == {"accuracy": {"a": [0.5, 0.25]}}


def test_probe_features_are_standardised_by_the_training_split_alone():
    """The probe sees the same inputs whatever the features' scale (a DyT encoder's features spread
    less than a LayerNorm's) and each dimension's offset, and every split is scaled by the training
    split's statistics, never its own."""
    generator = torch.Generator().manual_seed(0)
    splits = {name: torch.utils.data.TensorDataset(torch.randn(n, 4, generator=generator), torch.arange(n) % 3)
              for name, n in (("train", 50), ("validation", 20), ("test", 20))}
    scale, shift = 0.02, torch.tensor([5.0, -1.0, 0.0, 2.0])
    moved = {name: torch.utils.data.TensorDataset(d.tensors[0] * scale + shift, d.tensors[1]) for name, d in splits.items()}
    plain, rescaled = standardized(splits), standardized(moved)
    for name in splits:
        torch.testing.assert_close(rescaled[name].tensors[0], plain[name].tensors[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(plain[name].tensors[1], splits[name].tensors[1])
    train = plain["train"].tensors[0]
    torch.testing.assert_close(train.mean(0), torch.zeros(4), atol=1e-6, rtol=0)
    raw_train, raw_test = splits["train"].tensors[0], splits["test"].tensors[0]
    variance = raw_train.var(0)
    floor = Standardize.EPS * variance.mean()
    torch.testing.assert_close(train.std(0), (variance / (variance + floor)).sqrt())
    torch.testing.assert_close(plain["test"].tensors[0], (raw_test - raw_train.mean(0)) / (variance + floor).sqrt())


@pytest.mark.parametrize("pretrained", [True, False])
def test_the_random_init_probe_draws_its_backbone_per_seed(pretrained, monkeypatch):
    """An untrained backbone drawn once (from the first seed) made the random-init probe's ± the
    linear head's noise alone, and its "pretrained − random init" band too narrow; a trained one is
    the same for every seed, so its features are taken once."""
    import dyt_wav2vec2.eval as w2v_eval
    from dyt.train.finetune import FinetuneConfig
    from dyt_wav2vec2.audio import Utterance

    config = load_config(Wav2Vec2PretrainConfig, ROOT / "recipes/wav2vec2/tiny.yaml")
    drawn = []

    def make():
        drawn.append(1)
        return build_wav2vec2(config.model)

    monkeypatch.setattr(w2v_eval, "load_pretrained", lambda run, pretrained, device: (config, make))
    waves = torch.randn(4, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    monkeypatch.setattr(w2v_eval, "_keyword_rows", lambda data, name: w2v_eval.LabeledAudio(
        [Utterance(Path("x"), 16000, "one")] * 4, [0, 1, 2, 3]))
    monkeypatch.setattr(w2v_eval, "load_audio", lambda path: waves[0])
    monkeypatch.setattr(w2v_eval.LabeledAudio, "__getitem__", lambda self, i: (waves[i], self.labels[i]))
    seen = {}

    def fake_finetune(builder, train, validation, tests, collate, objective, cfg, seed, **_):
        seen[seed] = train.tensors[0]
        return seed

    monkeypatch.setattr(w2v_eval, "finetune", fake_finetune)
    list(w2v_eval.keyword_eval(Path("run"), Path("data"), "probe", FinetuneConfig(), [0, 1, 2], pretrained))
    assert sorted(seen) == [0, 1, 2]
    if pretrained:
        assert len(drawn) == 1 and seen[0] is seen[1] is seen[2]
    else:
        assert len(drawn) == 3 and not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])


def test_word_error_rate_on_hand_checked_strings():
    assert word_error_rate(["the cat sat"], ["the cat sat"]) == 0
    assert word_error_rate(["the cat"], ["the cat sat"]) == pytest.approx(1 / 3)  # one deletion
    assert word_error_rate(["a the cat sat on"], ["the cat sat"]) == pytest.approx(2 / 3)  # two insertions
    assert word_error_rate(["the dog sat", "hello"], ["the cat sat", "hello world"]) == pytest.approx(2 / 5)


def test_ctc_reads_cached_conv_features_exactly_as_the_whole_model_would(speech):
    """Fine-tuning freezes the feature extractor and reads its output computed once per utterance:
    the recogniser on cached features equals the head on the uncached encoder fed as pretraining
    feeds it (the waveform normalised)."""
    _, rows = speech
    model, backbone = build_wav2vec2(_config().model).eval(), build_wav2vec2(_config().model)
    backbone.load_state_dict(model.state_dict())
    recogniser = CTCModel(backbone, 64).eval()
    assert not any(name.startswith("backbone.encoder_frontend.feature_extractor") for name, _ in recogniser.named_parameters())
    with torch.no_grad():
        for row, features in zip(rows, conv_features(model, rows)):
            wave, lengths = crop_and_batch([load_audio(row.path)], crop=10**9)
            expected = recogniser.head(encode(model, wave, lengths)[0]).log_softmax(-1)  # identity standardize
            got, frames = recogniser(features[None], torch.tensor([len(features)]))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ctc_head_reads_the_encoder_standardised_by_the_training_frames(speech):
    """Before fine-tuning, the head's input over every valid training frame has mean 0 and std 1 per
    dimension, whatever the encoder's scale (a DyT's bounded output spreads less), and padding
    frames do not enter the statistics."""
    _, rows = speech
    model = build_wav2vec2(_config().model).eval()
    features = conv_features(model, rows)
    dataset, lengths = Transcribed(features, rows), [len(f) for f in features]
    recogniser = CTCModel(model, 64).fit_standardize(dataset, lengths, batch_size=2)
    assert recogniser.training
    with torch.no_grad():
        encoded = torch.cat([recogniser.encoded(f[None], torch.tensor([len(f)]))[0] for f in features])
        head_input = recogniser.standardize(encoded)
    torch.testing.assert_close(head_input.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    variance = encoded.double().var(0)
    torch.testing.assert_close(head_input.std(0).double(), (variance / (variance + Standardize.EPS * variance.mean())).sqrt(), atol=1e-4, rtol=0)
    assert not torch.allclose(encoded.std(0), torch.ones(64), atol=0.05)  # the raw encoder is not already standard


def test_ctc_masking_masks_spans_of_frames_and_channels_of_each_row_in_training_only(speech):
    """Fine-tuning masks the encoder's input: in each row spans of frames get the pretrained mask
    vector (up to the time probability, less by overlap), spans of channels are zeroed, padding and
    a row too short for one span stay untouched; in evaluation the recogniser reads its input
    unmasked, so its scores do not depend on the masks."""
    masking = CTCMasking(time_prob=0.5, time_span=10, channel_prob=0.5, channel_span=8)
    embed = torch.nn.Parameter(torch.full((64,), 7.0))
    torch.manual_seed(0)
    seqs = torch.randn(3, 200, 64)
    masked, time = FinetuneMasker(masking, embed)(seqs.clone(), BatchLayout(seqs.shape[:2], seq_lens=[200, 120, 10]))
    channels = (masked == 0).all(1)  # (rows, channels) zeroed at every frame
    assert 0.25 < time[0].float().mean() <= 0.5 and 0.25 < time[1, :120].float().mean() <= 0.5
    assert not time[1, 120:].any() and not time[2].any()  # padding; 10 frames hold no 10-frame span
    assert 0.2 < channels.float().mean(1).min() and channels.float().mean(1).max() <= 0.5
    kept = ~channels[:, None, :]
    assert torch.equal(masked[time[..., None] & kept], embed.expand(3, 200, 64)[time[..., None] & kept])
    assert torch.equal(masked[~time[..., None] & kept], seqs[~time[..., None] & kept])
    with pytest.raises(ValueError, match="time_prob"):
        CTCMasking(time_prob=1.0)

    _, rows = speech
    model = build_wav2vec2(_config("model.dropout=0", "model.layer_drop=0").model)  # train mode: only masks vary
    features = conv_features(model, rows)[0][None]
    frames = torch.tensor([features.shape[1]])
    recogniser = CTCModel(model, 64, masking)
    assert recogniser.masker.mask_embed is model.masker.temporal_mask_embed
    with torch.no_grad():
        unmasked = recogniser.eval().encoded(features, frames)
        assert torch.equal(recogniser.encoded(features, frames), unmasked)
        trained = recogniser.train().encoded(features, frames)
        recogniser.masker = None
        assert torch.equal(recogniser.encoded(features, frames), unmasked)
    assert not torch.allclose(trained, unmasked, atol=1e-3)
    assert CTCModel(build_wav2vec2(_config().model), 64).masker is None  # CTCMasking() masks nothing


def test_keyword_fine_tune_head_reads_pooled_features_standardised_by_the_training_split(speech):
    _, rows = speech
    dataset = LabeledAudio(rows, [0, 1, 2])
    classifier = KeywordClassifier(build_wav2vec2(_config().model), 64).fit_standardize(dataset)
    assert classifier.training
    with torch.no_grad():
        raw = torch.cat([pooled(classifier.backbone.eval(), _collate_labels([item])[0]) for item in dataset])
        head_input = classifier.standardize(raw)
    torch.testing.assert_close(head_input.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    variance = raw.double().var(0)
    torch.testing.assert_close(head_input.std(0).double(), (variance / (variance + Standardize.EPS * variance.mean())).sqrt(), atol=1e-4, rtol=0)
    assert not torch.allclose(raw.std(0), torch.ones(64), atol=0.05)



def _ctc_data_and_run(speech, tmp_path):
    """The few synthetic utterances as every CTC manifest in ``tmp_path``, and an untrained tiny run
    folder: (the utterances, the run)."""
    root, rows = speech
    for name in ("sentences-train", "sentences-validation", *CTC_TESTS.values()):
        write_manifest(tmp_path / f"{name}.tsv", root, rows)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TINY.read_text())
    return rows, run

@pytest.mark.parametrize("sabotage", [False, True], ids=["lr", "lr-0"])
def test_ctc_finetunes_through_the_shared_loop(speech, tmp_path, monkeypatch, sabotage):
    """CTC goes through dyt.train.finetune with its objective (selection by validation CER); on
    three utterances the CTC loss leaves the all-blank plateau (~100 steps) within 150, and stays
    put at lr 0."""
    from dyt_wav2vec2 import eval as w2v_eval

    rows, run = _ctc_data_and_run(speech, tmp_path)
    objectives = []
    real_finetune = w2v_eval.finetune

    def spy(make_model, train, validation, tests, collate, objective, *args, **kwargs):
        objectives.append(objective)
        return real_finetune(make_model, train, validation, tests, collate, objective, *args, **kwargs)

    monkeypatch.setattr(w2v_eval, "finetune", spy)
    settings = w2v_eval.CTCSettings(steps=150, lr=0.0 if sabotage else 3e-3, batch_size=3)
    result, = w2v_eval.ctc_eval(run, tmp_path, [0], pretrained=False, settings=settings)
    assert [type(o).__name__ for o in objectives] == ["CTCObjective"] and objectives[0].selection == "cer"
    losses = [c["validation/loss"] for c in result.curve]
    if sabotage:
        assert losses[-1] == pytest.approx(losses[0], rel=1e-6)
    else:
        assert losses[-1] < 0.5 * losses[0], losses
    assert set(result.test) == set(CTC_TESTS) and all({"cer", "wer"} <= set(m) for m in result.test.values())
    assert [ref for ref, _ in result.details["unseen voices"]] == [r.text for r in rows]


def test_the_random_init_ctc_draws_its_feature_extractor_per_seed(speech, tmp_path, monkeypatch):
    """As the probe: an untrained conv extractor drawn once (from the first seed) made every seed's
    frozen features the same, and the random-init row's spread the head's and encoder's alone."""
    from dyt_wav2vec2 import eval as w2v_eval

    rows, run = _ctc_data_and_run(speech, tmp_path)
    seen = {}

    def spy(make_model, train, validation, tests, collate, objective, cfg, seed, **kwargs):
        seen[seed] = train.features[0]
        return seed

    monkeypatch.setattr(w2v_eval, "finetune", spy)
    list(w2v_eval.ctc_eval(run, tmp_path, [0, 1], pretrained=False, settings=w2v_eval.CTCSettings(steps=1, batch_size=3)))
    assert sorted(seen) == [0, 1] and seen[0].shape == seen[1].shape and not torch.allclose(seen[0], seen[1])


def test_every_speech_eval_runs_on_the_device_asked_for(speech, tmp_path, monkeypatch):
    """``--device`` reaches each eval and what it runs there: the contrastive eval's model and
    batches, the backbones whose features are frozen, the fine-tuning loop. The meta device
    stands in for a GPU: the spies stop each eval before a value would be read."""
    from dyt.train.finetune import module_device
    from dyt_wav2vec2 import eval as w2v_eval

    rows, run = _ctc_data_and_run(speech, tmp_path)
    write_manifest(tmp_path / "real-keywords.tsv", *speech)
    meta, seen = torch.device("meta"), []
    def started(*args):
        seen.append(("main", args[-1]))
        raise InterruptedError  # the eval asked for: nothing to run

    with monkeypatch.context() as patched, pytest.raises(InterruptedError):
        patched.setattr(w2v_eval, "eval_results", started)
        w2v_eval.main(["--run", str(run), "--random-init", "--data", str(tmp_path), "--evals", "ctc", "--seeds", "0",
                       "--device", "cpu"])
    assert seen == [("main", torch.device("cpu"))]

    seen.clear()
    monkeypatch.setattr(w2v_eval, "pretraining_loss", lambda model, batch, loss: seen.append(
        ("contrastive", module_device(model), *(t.device for t in batch))) or (None, {}))
    monkeypatch.setattr(w2v_eval, "conv_features", lambda model, utterances: seen.append(
        ("conv features", module_device(model))) or [torch.zeros(5, 8) for _ in utterances])
    monkeypatch.setattr(w2v_eval, "_frozen_features", lambda model, dataset: seen.append(
        ("pooled features", module_device(model))) or torch.utils.data.TensorDataset(torch.randn(4, 8), torch.arange(4)))
    monkeypatch.setattr(w2v_eval, "_keyword_rows", lambda data, name: w2v_eval.LabeledAudio(rows, [0, 1, 2]))
    monkeypatch.setattr(w2v_eval, "finetune", lambda *args, desc, device, **kwargs: seen.append(
        (desc, device)) or w2v_eval.FinetuneResult(0, 0, {}, {}, {}, []))
    for name in w2v_eval.EVALS:
        list(w2v_eval.eval_results(name, run, tmp_path, [0], 1, pretrained=False, device=meta))
    where = {}
    for step, *devices in seen:
        where.setdefault(step.split(" (")[0].split(" seed")[0], set()).update(devices)
    assert where == {"contrastive": {meta}, "pooled features": {meta}, "keywords probe": {meta},
                     "keywords finetune": {meta}, "conv features": {meta}, "CTC": {meta}}, seen


def test_the_ctc_budget_is_the_run_configs_unless_given(speech, tmp_path, monkeypatch, capsys):
    """A small.yaml run evaluated without --ctc-steps / --ctc-lr took the tiny model's budget and rate
    (4000 steps at 5e-3, against the 8000 at 2e-3 chosen for small): the eval now takes what the run's
    config.yaml says in its eval section, the options overriding it, and says which; the compare takes
    --config's. small.yaml's own section holds the chosen budget, a sweep of it is refused (every run
    of a comparison is evaluated alike), and --resume does not compare it (pretraining reads none of
    it)."""
    from dyt_wav2vec2 import compare
    from dyt_wav2vec2 import eval as w2v_eval

    assert load_config(Wav2Vec2PretrainConfig, ROOT / "recipes/wav2vec2/small.yaml", check_files=False).eval == \
        SpeechEvalConfig(ctc_steps=8000, ctc_lr=2e-3)
    assert load_config(Wav2Vec2PretrainConfig, TINY, check_files=False).eval == SpeechEvalConfig()
    _, run = _ctc_data_and_run(speech, tmp_path)
    without_section = TINY.read_text().split("\neval:")[0] + "\n"  # as a run from before the section
    (run / "config.yaml").write_text(without_section + "eval: {ctc_steps: 7, ctc_lr: 1.0e-3}\n")
    budgets = []

    def results(name, run_dir, data, seeds, steps, ctc, *rest):
        budgets.append((ctc.steps, ctc.lr))
        yield from ({"seed": seed, "test": {"unseen voices": {"cer": 0.5, "wer": 0.5}}} for seed in seeds)

    monkeypatch.setattr(w2v_eval, "eval_results", results)
    command = ["--run", str(run), "--random-init", "--data", str(tmp_path), "--evals", "ctc", "--seeds", "0"]
    w2v_eval.main(command)
    assert f"CTC budget: 7 steps at peak lr 0.001, tri-stage (the eval section of {run / 'config.yaml'})" in \
        capsys.readouterr().out
    w2v_eval.main([*command, "--ctc-steps", "9"])
    assert f"(--ctc-steps, the eval section of {run / 'config.yaml'})" in capsys.readouterr().out
    w2v_eval.main([*command, "--ctc-lr", "3e-3"])
    assert budgets == [(7, 1e-3), (9, 1e-3), (7, 3e-3)]
    (run / "config.yaml").write_text(without_section)
    w2v_eval.main(command)
    assert budgets[-1] == (4000, 5e-3)
    assert f"(the defaults, chosen for tiny.yaml: {run / 'config.yaml'} has no eval section (a small.yaml run from " \
           "before 2026-12-07 takes --ctc-steps 8000 --ctc-lr 2e-3))" in capsys.readouterr().out

    class Planned(Exception):
        pass

    def planned(spec, args, plan):
        raise Planned((args.ctc_steps, args.ctc_lr))

    for name, value in [("eval_speech", lambda data: None), ("Wav2Vec2PretrainTask", lambda config: None),
                        ("prepare_out", lambda args: None), ("train_runs", planned)]:
        monkeypatch.setattr(compare, name, value)
    small = ["--config", str(ROOT / "recipes/wav2vec2/small.yaml"), "--out", str(tmp_path / "cmp"), "--evals", "ctc"]
    for extra, budget in [([], (8000, 2e-3)), (["--set", "eval.ctc_steps=5"], (5, 2e-3)), (["--ctc-lr", "1e-2"], (8000, 1e-2))]:
        with pytest.raises(Planned) as stopped:
            compare.main([*small, *extra])
        assert stopped.value.args[0] == budget, extra
    assert "CTC budget: 8000 steps at peak lr 0.01, tri-stage (--ctc-lr, the eval section of " in capsys.readouterr().out
    with pytest.raises(Planned) as stopped:  # the default config, the packaged tiny.yaml, says its own
        compare.main(["--out", str(tmp_path / "cmp"), "--evals", "ctc"])
    assert stopped.value.args[0] == (4000, 5e-3)
    assert "CTC budget: 4000 steps at peak lr 0.005, tri-stage (the eval section of " in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        compare.main([*small, "--sweep", "eval.ctc_lr=1e-3,2e-3"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dyt-wav2vec2-compare: compare error: --sweep eval.ctc_lr: eval holds the settings of what runs after training "
        "(no training reads them, and every run of a comparison is evaluated alike), so every point would train the same "
        "model: give it with --set eval.ctc_lr=VALUE")
    saved = load_config(Wav2Vec2PretrainConfig, ROOT / "recipes/wav2vec2/small.yaml", check_files=False)
    assert resume_changes(saved, dataclasses.replace(saved, eval=SpeechEvalConfig(ctc_steps=1))) == ([], [], [])


def test_the_eval_writes_each_seed_to_out_as_it_finishes_and_resumes_from_it(speech, tmp_path, monkeypatch, capsys):
    """A kill in an eval's second seed keeps the finished evals and seeds in ``--out`` (the file was
    written only at the end: a kill in CTC's third seed lost every finished fine-tuning); the same
    command again reads them back and computes the missing seed alone (it recomputed everything,
    and replaced the file at its first seed). Each finished seed is said in one line."""
    from dyt_wav2vec2 import eval as w2v_eval

    _, run = _ctc_data_and_run(speech, tmp_path)
    write_manifest(tmp_path / "real-keywords.tsv", *speech)  # the contrastive eval's too
    computed, killed = [], [("ctc", 1)]

    def results(name, run_dir, data, seeds, *rest):
        for seed in seeds:
            if (name, seed) in killed:
                killed.clear()
                raise KeyboardInterrupt
            computed.append((name, seed))
            yield {"seed": seed, "test": {"unseen voices": {metric: seed / 10 for metric in w2v_eval.HEADLINE[name]}}}

    monkeypatch.setattr(w2v_eval, "eval_results", results)
    out = tmp_path / "results.json"
    command = ["--run", str(run), "--random-init", "--data", str(tmp_path), "--evals", "contrastive", "ctc",
               "--seeds", "0", "1", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        w2v_eval.main(command)
    stored = json.loads(out.read_text())["evals"]
    assert {name: list(entry["seeds"]) for name, entry in stored.items()} == {
        "contrastive-random-init": ["0", "1"], "ctc-random-init": ["0"]}
    settings = stored["ctc-random-init"]["settings"]
    assert settings["ctc"]["steps"] == w2v_eval.CTCSettings.steps and not settings["pretrained"]
    assert settings["speech"].startswith("manifests-") and stored["ctc-random-init"]["seeds"]["0"]["run"] == str(run)
    assert "ctc seed 0: cer on unseen voices 0.000, wer on unseen voices 0.000" in capsys.readouterr().out
    results_now = w2v_eval.main(command)
    assert computed == [("contrastive", 0), ("contrastive", 1), ("ctc", 0), ("ctc", 1)]
    assert [row["seed"] for row in results_now["ctc"]] == [0, 1]
    said = capsys.readouterr().out
    assert "contrastive-random-init: seeds [0, 1] read back from" in said and "ctc-random-init: seeds [0] read back" in said
    assert list(json.loads(out.read_text())["evals"]["ctc-random-init"]["seeds"]) == ["0", "1"]
    (tmp_path / "sentences-test.wrd").write_text("please enter your account number\nalpha\nx\n")
    with pytest.raises(SystemExit):  # other speech: refused, not replaced
        w2v_eval.main(command)
    assert "holds contrastive-random-init results of other settings (speech 'manifests-" in capsys.readouterr().err
    assert computed[4:] == []  # refused before any eval computed


def test_the_eval_checks_the_transcripts_it_scores_before_any_work(speech, tmp_path, capsys):
    """A keyword outside the 36, or a CTC transcript with a capital or a digit, was a ValueError
    after minutes of work (the CTC test set's after the whole fine-tune): one line naming the line."""
    from dyt_wav2vec2 import eval as w2v_eval

    _, run = _ctc_data_and_run(speech, tmp_path)
    (tmp_path / "sentences-test.wrd").write_text("please enter your account number\nPress 1\nalpha\n")

    def refused(*evals: str) -> str:
        with pytest.raises(SystemExit):
            w2v_eval.main(["--run", str(run), "--random-init", "--data", str(tmp_path), "--evals", *evals,
                           "--seeds", "0"])
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert refused("ctc") == (f"dyt_wav2vec2.eval: audio error: {tmp_path / 'sentences-test.wrd'}:2: 'Press 1' holds "
                              "'P', outside the CTC eval's characters (a-z, space, apostrophe): give transcripts in "
                              "lower case, numbers spelled out")
    for split in ("train", "validation", "test"):
        write_manifest(tmp_path / f"keywords-{split}.tsv", *speech)
    write_manifest(tmp_path / "real-keywords.tsv", *speech)
    assert refused("probe").endswith("keywords-train.wrd:1: 'please enter your account number' is not one of the 36 "
                                     "keywords the probe eval classifies (zero, one, two, ..., zulu)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_every_speech_eval_runs_on_its_device(speech, tmp_path, device):
    """Each eval's whole path runs on the device given (on a GPU machine, there): the contrastive
    pass, the probe's frozen features, the keyword fine-tune, CTC's cached conv features and its
    fine-tuning (2 steps each, a random-init tiny model, three utterances)."""
    import dataclasses

    from dyt_wav2vec2 import eval as w2v_eval

    root, rows = speech
    _, run = _ctc_data_and_run(speech, tmp_path)
    said = [dataclasses.replace(row, text=word) for row, word in zip(rows, KEYWORDS)]  # as if keywords
    for name in ("keywords-train", "keywords-validation", *KEYWORD_TESTS.values()):
        write_manifest(tmp_path / f"{name}.tsv", root, said)
    ctc = w2v_eval.CTCSettings(steps=2, batch_size=3)
    results = {name: list(w2v_eval.eval_results(name, run, tmp_path, [0], 2, ctc, pretrained=False,
                                                device=torch.device(device))) for name in w2v_eval.EVALS}
    assert list(results) == w2v_eval.EVALS and all(len(rows) == 1 for rows in results.values())
    assert all(0 <= r["test"][t]["accuracy"] <= 1 for r in results["probe"] + results["finetune"] for t in KEYWORD_TESTS)
    assert all(r["test"][t]["cer"] >= 0 for r in results["ctc"] for t in CTC_TESTS)


def test_greedy_ctc_decoding_merges_repeats_and_drops_blanks():
    ids = [text_to_ids(c).item() if c != "_" else 0 for c in "hh_ee_ll_llo  _wo"]
    log_probs = torch.nn.functional.one_hot(torch.tensor([ids]), 29).float().log()
    assert greedy_decode(log_probs, torch.tensor([len(ids)])) == ["hello wo"]
    assert normalize_text("Please enter your account number, followed by the pound-key.") == \
        "please enter your account number followed by the pound key"


def test_prompt_transcripts_are_the_words_the_recordings_say():
    """The Asterisk documentation writes keys as digits and symbols and adds notes in parentheses:
    the transcripts (what the voices are given to say and what WER scores the real recordings
    against) spell the keys and drop the notes; a prompt whose text says nothing, or holds a number
    the text does not spell, is left out."""
    assert spoken_text("press 1 to accept this recording press 2 to listen to it") == \
        "press one to accept this recording press two to listen to it"
    assert spoken_text("or 9 to save this message") == "or nine to save this message"
    assert spoken_text("press * to toggle pause, press # to enter a new dictation filename") == \
        "press star to toggle pause press pound to enter a new dictation filename"
    assert spoken_text("Press 0 for greetings.  Press 5.") == "press zero for greetings press five"
    assert spoken_text('IAX (note: does not say "2")') == "iax"
    assert spoken_text("When done hang up. (simple tone sound plays)") == "when done hang up"
    assert spoken_text("(10 seconds of silence)") is None
    assert spoken_text("3D audio enabled") is None and spoken_text("H.323") is None


def test_classification_metrics_on_a_hand_checked_confusion():
    predicted, target = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 2, 0])
    confusion = confusion_matrix(predicted, target, 3)
    assert confusion.tolist() == [[1, 0, 1], [1, 2, 0], [0, 0, 1]]
    scores = classification_metrics(confusion)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # macro F1: class 0 1/(2), class 1 2*2/(3+2), class 2 2*1/(1+2)
    assert scores["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # Gorodkin: (c*s - sum p_k t_k) / sqrt((s^2 - sum p^2)(s^2 - sum t^2)), c=4, s=6, p=(2,2,2), t=(2,3,1)
    assert scores["mcc"] == pytest.approx((4 * 6 - (2 * 2 + 2 * 3 + 2 * 1)) / ((36 - 12) * (36 - 14)) ** 0.5)
    assert classification_metrics(torch.tensor([[5, 0], [0, 5]]))["mcc"] == pytest.approx(1.0)
    # class 2 predicted twice, never true: its F1 is 0 and counts (scikit-learn's macro F1), class 3 is absent
    scores = classification_metrics(torch.tensor([[3, 0, 1, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert scores["f1"] == pytest.approx((2 * 3 / (4 + 3) + 2 * 2 / (3 + 2) + 0) / 3)


def test_keyword_classes():
    assert len(KEYWORDS) >= 30 and len(set(KEYWORDS)) == len(KEYWORDS)


# ---------------------------------------------------------------- a 2-rank run with resume

@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_pretraining_resumes_on_the_same_curve(speech, tmp_path):
    folder, rows = speech
    write_manifest(tmp_path / "train.tsv", folder, rows[:2] * 4)
    write_manifest(tmp_path / "valid.tsv", folder, rows[2:] * 4)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}

    def launch(out, steps, *extra):
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "dyt_wav2vec2.train",
               "--config", str(TINY), "--set", "model.norm=dyt", "--set", f"data.train_manifest={tmp_path / 'train.tsv'}",
               "--set", f"data.validation_manifest={tmp_path / 'valid.tsv'}", "--set", "train.micro_batch_size=2",
               "--set", "train.grad_accum=2", "--set", f"train.steps={steps}", "--set", "train.eval_every=2", "--set", "train.save_every=2",
               "--set", "train.log_every=1", "--set", "train.progress=false", "--set", f"train.out_dir={out}", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        printed.append(proc.stdout)
        return read_metrics(out / "metrics.jsonl")

    printed: list[str] = []
    whole = launch(tmp_path / "whole", 4)
    # a copy cut back to step 2, as if the run had died in step 4 (its step-4 checkpoint and metrics
    # row never written; row 3 is the resume's to drop). tests/test_harness.py's 2-rank toy launcher
    # test covers a resume that raises train.steps.
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_00000004")
    (tmp_path / "split" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole[:3]))
    resumed = launch(tmp_path / "split", 4, "--resume")
    # all 4 steps sit in the warm-up, so a silent fresh start would match too: it must say it resumed
    assert re.search(r"resumed from \S*step_00000002 \(step 2,", printed[-1]), printed[-1][-2000:]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # row 3 dropped and written again, row 4 new
    assert "train/codebook_perplexity" in resumed[-1] and "alpha/encoder.layers.0.self_attn_layer_norm" in resumed[-1]
    np.testing.assert_allclose([r["train/loss"] for r in resumed[2:]], [r["train/loss"] for r in whole[2:]], rtol=1e-5)
    # the Gumbel temperature anneals per update, not per forward: 4 updates of 2 micro-batches each
    for out in ("whole", "split"):
        states = torch.load(next((tmp_path / out / "checkpoints" / "step_00000004").glob("*model_states.pt")),
                            weights_only=False)["module"]
        assert int(states["quantizer.num_updates"]) == 4, out


def test_the_eval_builds_the_builtin_speech_at_the_runs_size(tmp_path, monkeypatch):
    """Without ``--data`` the eval asks for the speech the run was pretrained beside, at the run's
    ``data.builtin_sentences``: a default-sized build would rewrite that folder's manifests."""
    import dyt_wav2vec2.task as task
    from dyt.train import dump_yaml
    from dyt_wav2vec2.eval import main as evaluate

    run = tmp_path / "run"
    run.mkdir()
    config = load_config(task.Wav2Vec2PretrainConfig, ROOT / "recipes/wav2vec2/tiny.yaml", ["data.builtin_sentences=60"])
    (run / "config.yaml").write_text(dump_yaml(config))
    asked = []

    class Built(Exception):
        pass

    def fake_build(out=None, per_split=None, **_):
        asked.append(per_split)
        raise Built

    monkeypatch.setattr(task, "build", fake_build)
    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))  # nothing real is built, even if this fails
    with pytest.raises(Built):
        evaluate(["--run", str(run), "--random-init", "--evals", "ctc", "--seeds", "0"])
    assert asked == [{"train": 60, "validation": 200, "test": 200}]


def test_a_full_disk_while_building_the_speech_is_one_line(tmp_path, monkeypatch):
    """The built-in speech synthesised onto a full disk stopped with a traceback: one audio error
    naming the folder and what to do, and no completion mark (the next run builds it again)."""
    import errno

    from dyt_wav2vec2 import speech

    def full(out, *args):
        (out / "audio").mkdir(parents=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "audio" / "s00001.wav"))

    monkeypatch.setattr(speech, "_synthesize_all", full)
    with pytest.raises(AudioError, match=rf"^the disk is full, or the quota spent \(No space left on device, writing in "
                                         rf"{tmp_path / 'speech' / 'audio' / 's00001.wav'}, \d+ MiB free there\)"):
        speech.build(tmp_path / "speech")
    assert not (tmp_path / "speech" / ".complete").exists()
