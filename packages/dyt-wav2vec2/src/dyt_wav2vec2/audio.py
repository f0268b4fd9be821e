"""Audio inputs: fairseq-style manifests (first line the root dir, then ``path<TAB>num_samples``),
folders of audio, HF ``datasets`` with an Audio column (saved with ``save_to_disk``), decoding with
soundfile, resampling to 16 kHz with torchaudio. Bad files stop a
run with their name, unless ``max_bad_fraction`` allows skipping a stated share of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import soundfile
import torch
import torchaudio

SAMPLE_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class AudioError(ValueError):
    """An audio file or manifest row that cannot be used; the message names it."""


@dataclass
class Utterance:
    path: Path
    num_samples: int
    text: str = ""


def load_audio(path: Path | BinaryIO, name: str | None = None) -> torch.Tensor:
    """Mono float32 waveform at 16 kHz from a file (or a file object; ``name`` then names it in errors)."""
    name = name or str(path)
    try:
        data, rate = soundfile.read(path if not isinstance(path, Path) else str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise AudioError(f"{name}: unreadable audio ({error})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{name}: empty audio (0 samples)")
    if data.shape[1] != 1:
        raise AudioError(f"{name}: {data.shape[1]} channels; wav2vec 2.0 takes mono audio")
    waveform = torch.from_numpy(data[:, 0])
    if rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, rate, SAMPLE_RATE)
    return waveform


def read_manifest(path: Path, texts: Path | None = None) -> list[Utterance]:
    """Rows of a fairseq manifest; ``texts`` (one line per row, e.g. a .wrd file) adds transcripts."""
    if not path.is_file():
        raise AudioError(f"{path}: no such manifest")
    lines = path.read_text().splitlines()
    if not lines:
        raise AudioError(f"{path}: empty manifest (the first line must be the audio root dir)")
    root = Path(lines[0].strip())
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise AudioError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
        audio = root / parts[0]
        if not audio.is_file():
            raise AudioError(f"{path}:{number}: audio file {audio} does not exist")
        rows.append(Utterance(audio, int(parts[1])))
    if texts is not None:
        transcripts = texts.read_text().splitlines()
        if len(transcripts) != len(rows):
            raise AudioError(f"{texts}: {len(transcripts)} transcripts for {len(rows)} manifest rows")
        for row, text in zip(rows, transcripts):
            row.text = text
    return rows


def write_manifest(path: Path, root: Path, utterances: list[Utterance]) -> None:
    """A fairseq manifest for ``utterances`` (all under ``root``), plus ``.wrd`` transcripts if any."""
    lines = [str(root.resolve())] + [f"{u.path.relative_to(root)}\t{u.num_samples}" for u in utterances]
    path.write_text("\n".join(lines) + "\n")
    if any(u.text for u in utterances):
        path.with_suffix(".wrd").write_text("\n".join(u.text for u in utterances) + "\n")


def manifest_from_folder(folder: Path, out: Path) -> list[Utterance]:
    """Build a manifest for every audio file under ``folder`` (``python -m dyt_wav2vec2.manifest``)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise AudioError(f"{folder}: no {', '.join(AUDIO_SUFFIXES)} files")
    utterances = []
    for path in files:
        try:
            info = soundfile.info(str(path))
        except (soundfile.LibsndfileError, RuntimeError) as error:
            raise AudioError(f"{path}: unreadable audio ({error})") from None
        utterances.append(Utterance(path, round(info.frames * SAMPLE_RATE / info.samplerate)))
    write_manifest(out, folder, utterances)
    return utterances


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def utterances_from_hf_dataset(path: Path, cache: Path, text_column: str = "text") -> list[Utterance]:
    """The audio of a saved HF dataset, written once as 16 kHz wav files under ``cache`` (keyed by
    the dataset's fingerprint), so every input takes the same path through the pipeline."""
    import io

    import datasets

    rows = datasets.load_from_disk(str(path))
    if isinstance(rows, datasets.DatasetDict):
        raise AudioError(f"{path}: a DatasetDict; point at one split's folder (e.g. {path}/train)")
    column = next((name for name, kind in rows.features.items() if isinstance(kind, datasets.Audio)), None)
    if column is None:
        raise AudioError(f"{path}: no Audio column among {list(rows.features)}")
    rows = rows.cast_column(column, datasets.Audio(decode=False))
    out = cache / rows._fingerprint
    manifest = out / "manifest.tsv"
    if manifest.is_file():
        return read_manifest(manifest, manifest.with_suffix(".wrd") if manifest.with_suffix(".wrd").is_file() else None)
    utterances = []
    for index, row in enumerate(rows):
        audio, name = row[column], f"{path}[{index}]"
        source = io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio.get("path")
        if source is None:
            raise AudioError(f"{name}: neither bytes nor a path")
        waveform = load_audio(Path(source) if isinstance(source, str) else source, name)
        target = out / f"{index:07d}.wav"
        target.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(target), waveform.numpy(), SAMPLE_RATE, subtype="PCM_16")
        utterances.append(Utterance(target, waveform.numel(), str(row.get(text_column, "") or "")))
    write_manifest(manifest, out, utterances)
    return utterances
