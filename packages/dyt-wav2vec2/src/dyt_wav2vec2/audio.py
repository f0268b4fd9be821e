"""Audio inputs: fairseq-style manifests (first line the root dir, then ``path<TAB>num_samples``),
folders of audio, decoding with soundfile, resampling to 16 kHz with torchaudio. Bad files stop a
run with their name, unless ``max_bad_fraction`` allows skipping a stated share of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def load_audio(path: Path) -> torch.Tensor:
    """Mono float32 waveform at 16 kHz."""
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise AudioError(f"{path}: unreadable audio ({error})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if data.shape[1] != 1:
        raise AudioError(f"{path}: {data.shape[1]} channels; wav2vec 2.0 takes mono audio")
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
