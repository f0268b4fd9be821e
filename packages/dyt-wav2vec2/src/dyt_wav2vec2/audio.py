"""Audio inputs: fairseq-style manifests (first line the root dir, then ``path<TAB>num_samples``),
folders of audio, HF ``datasets`` with an Audio column (saved with ``save_to_disk``), decoding with
soundfile, resampling to 16 kHz with torchaudio. Bad files (unreadable, empty, not mono,
truncated) stop a run with their name, unless ``max_bad_fraction`` allows skipping a stated share of
them; nothing is left out without a word."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import soundfile
import torch
import torchaudio
from filelock import FileLock

from dyt.errors import UserInputError
from dyt.train.jsonio import partial_path, read_json, write_json
from dyt_data import cache_folder, file_sha256, files_by_suffix, reported_as, worker_processes

SAMPLE_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif")
"""What the manifest tool lists in a folder (any case): what libsndfile decodes (mp3 since its 1.1)."""
TAKES_MONO = "wav2vec 2.0 takes mono audio (mix it down, e.g. sox in.wav -c 1 out.wav)"
"""What a multi-channel file is told, by the check of a file and by its reading alike."""


class AudioError(UserInputError):
    """An audio file or manifest row that cannot be used; the message names it."""

    kind = "audio error"


@dataclass
class Utterance:
    path: Path
    num_samples: int
    text: str = ""


READ_ERRORS = (RuntimeError, OSError)
"""What soundfile raises for a file it cannot open, seek in or decode (its LibsndfileError is a
RuntimeError)."""


def _unreadable(name: str, error: BaseException) -> AudioError:
    # libsndfile's own words, not its "Error opening <_io.BytesIO object at 0x...>" for a file object
    return AudioError(f"{name}: unreadable audio ({getattr(error, 'error_string', None) or error})")


def _length_unknown(name: str) -> AudioError:
    """A file whose length libsndfile does not know (a FLAC written to a pipe leaves it open in its
    header): soundfile cannot read it, whole or in blocks (its reads seek, which fails there)."""
    return AudioError(f"{name}: unreadable audio (its header does not give its length, as a FLAC written to a pipe "
                      "leaves it: soundfile cannot read it); re-encode it from a file, e.g. ffmpeg -i in.flac out.flac")


def _refuse_non_finite(name: str, waveform: torch.Tensor, start: int | None = None) -> None:
    """An AudioError naming the NaN or infinite samples of ``waveform``, the whole file or its samples
    from ``start`` on: a float WAV can hold them, and the loss would turn NaN at the first step."""
    finite = torch.isfinite(waveform)
    if not finite.all():
        first = (start or 0) + int((~finite).nonzero()[0])
        count = int((~finite).sum())
        which = (f"{count} sample{'s' if count != 1 else ''}" if start is None
                 else f"{count} of samples {start} to {start + waveform.numel() - 1}")
        raise AudioError(f"{name}: {which} {'is' if count == 1 else 'are'} NaN or infinite (first at sample {first})")


def load_audio(path: Path | BinaryIO, name: str | None = None) -> torch.Tensor:
    """Mono float32 waveform at 16 kHz from a file (or a file object; ``name`` then names it in errors)."""
    name = name or str(path)
    try:
        with soundfile.SoundFile(path if not isinstance(path, Path) else str(path)) as audio:
            rate = audio.samplerate
            if audio.frames >= UNKNOWN_FRAMES:  # soundfile's read would ask for 2^63 frames
                raise _length_unknown(name)
            data = audio.read(audio.frames, dtype="float32", always_2d=True)  # what soundfile.read asks
    except READ_ERRORS as error:
        raise _unreadable(name, error) from None
    if data.shape[0] == 0:
        raise AudioError(f"{name}: empty audio (0 samples)")
    if data.shape[1] != 1:
        raise AudioError(f"{name}: {data.shape[1]} channels; {TAKES_MONO}")
    waveform = torch.from_numpy(data[:, 0])
    _refuse_non_finite(name, waveform)
    if rate != SAMPLE_RATE:
        waveform = torchaudio.functional.resample(waveform, rate, SAMPLE_RATE)
    return waveform


SPAN_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF")
"""The containers a 16 kHz file of which is read a span at a time (:class:`AudioClip`) where
libsndfile can seek in it: it counts their frames from the data itself (MP3's it estimates). Others,
and these where it cannot seek (GSM 6.10, G.721, NMS ADPCM), are read whole as before."""

UNKNOWN_FRAMES = 2**63 - 1
"""libsndfile's frame count for a file whose length it does not know (SF_COUNT_MAX)."""


class AudioClip:
    """One file's audio as the pretraining batches read it: its length first (:meth:`numel`), then
    only the span a crop takes (:meth:`span`). A 16 kHz WAV (RF64, W64), FLAC or AIFF file that
    libsndfile can seek in is read a span at a time, so a ten-minute recording is no longer decoded
    whole (and held in memory) for each 2 s crop; any other file is decoded whole and resampled at
    :meth:`numel`, as :func:`load_audio` reads it. For an intact file the samples are the same either way; NaN or
    infinite samples, and damage inside a file whose ends read well, are found where a crop reads
    them (decoded whole, at any crop)."""

    def __init__(self, path: Path):
        self.path = path
        self._frames: int | None = None  # a file read by spans: its frames
        self._whole: torch.Tensor | None = None  # any other file, decoded

    def numel(self) -> int:
        """Its samples at 16 kHz: ``load_audio(path).numel()``, from the header where it can."""
        if self._frames is None and self._whole is None:
            try:
                with soundfile.SoundFile(str(self.path)) as audio:
                    rate, kind, channels, frames = audio.samplerate, audio.format, audio.channels, audio.frames
                    seekable = audio.seekable()
            except READ_ERRORS as error:
                raise _unreadable(str(self.path), error) from None
            if channels != 1:
                raise AudioError(f"{self.path}: {channels} channels; {TAKES_MONO}")
            if rate == SAMPLE_RATE and kind in SPAN_FORMATS and seekable and 0 < frames < UNKNOWN_FRAMES:
                self._frames = frames
            else:
                self._whole = load_audio(self.path)
        return self._frames if self._frames is not None else self._whole.numel()

    def span(self, start: int, length: int) -> torch.Tensor:
        """Samples ``[start, start + length)`` (within :meth:`numel`), float32 at 16 kHz."""
        total = self.numel()
        if not 0 <= start <= start + length <= total:
            raise ValueError(f"span [{start}, {start + length}) outside {self.path}'s {total} samples")
        if self._whole is not None:
            return self._whole[start : start + length]
        try:
            with soundfile.SoundFile(str(self.path)) as audio:
                audio.seek(start)
                data = audio.read(length, dtype="float32", always_2d=True)
        except READ_ERRORS as error:
            raise _unreadable(str(self.path), error) from None
        if data.shape[0] != length:  # shortened since it was counted
            raise AudioError(f"{self.path}: {total} samples when counted, but samples {start} to {start + length - 1} "
                             f"read {data.shape[0]}: changed during the run? Re-export or remove the file")
        waveform = torch.from_numpy(data[:, 0])
        _refuse_non_finite(str(self.path), waveform, start)
        return waveform


SAMPLE_CODED_WAV = (1, 3, 6, 7)
"""WAVE format tags whose ``data`` chunk holds whole frames of ``block_align`` bytes: PCM, IEEE
float, A-law, mu-law. Other codecs (ADPCM, GSM 6.10, ...) code blocks of many samples."""


@dataclass
class WavHeader:
    """What a RIFF/WAVE file's header says of its ``data`` chunk (:func:`_wav_header`)."""

    frames: int | None  # the frames its size holds (sample-coded); else the fact chunk's count, where it gives one
    sample_coded: bool
    missing_bytes: int  # of the data chunk's declared size, how many the file lacks


def _wav_header(path: Path) -> WavHeader | None:
    """The ``data`` chunk a RIFF/WAVE file's header declares (None: not a WAV, or a streamed one whose
    header leaves the size open). libsndfile reports the frames the file really holds, so a truncated
    WAV looks whole to it: this is what the header says. A block-coded file's last block may be
    partial, and libsndfile counts it whole, so its truncation shows in bytes, not frames."""
    try:
        with open(path, "rb") as handle:
            size_on_disk = os.fstat(handle.fileno()).st_size  # the open file's: no second stat of the path
            head = handle.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = tag = fact = data = None
            while True:
                chunk = handle.read(8)
                if len(chunk) < 8:
                    break
                name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"fmt ":
                    fmt = handle.read(size + (size & 1))
                    tag = struct.unpack("<H", fmt[:2])[0] if len(fmt) >= 2 else None
                    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: its sub-format's tag
                        tag = struct.unpack("<H", fmt[24:26])[0]
                    block_align = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else None
                elif name == b"fact":
                    body = handle.read(size + (size & 1))
                    fact = struct.unpack("<I", body[:4])[0] if len(body) >= 4 else None
                elif name == b"data":
                    if size in (0, 0xFFFFFFFF) or not block_align:
                        return None
                    data = (handle.tell(), size)
                    if tag in SAMPLE_CODED_WAV:
                        break
                    handle.seek(size + (size & 1), 1)  # a block-coded file's fact chunk may come after its data
                else:
                    handle.seek(size + (size & 1), 1)
    except OSError:
        return None
    if data is None:
        return None
    (start, size), sample_coded = data, tag in SAMPLE_CODED_WAV
    frames = size // block_align if sample_coded else (fact if fact not in (0, 0xFFFFFFFF) else None)
    return WavHeader(frames, sample_coded, max(0, start + size - size_on_disk))


def inspect_audio(path: Path, decode: bool = False) -> int:
    """The samples at 16 kHz of one audio file as training reads it, or an AudioError naming the file
    and what is wrong: unreadable, not mono, empty, truncated (a WAV whose header promises more samples
    or bytes than the file holds), or a bad sample rate. ``decode`` reads every sample (the manifest
    tool; a float file's NaN or infinite samples are an error there, and where training reads them);
    without it the header is checked against the file and the last sample libsndfile counts is read,
    which costs the same for any length (training's check of every file at start). A file libsndfile
    cannot seek in (GSM 6.10, G.721, NMS ADPCM) is taken at libsndfile's count, which follows its
    bytes; one whose length it does not know (a FLAC written to a pipe) is unreadable to soundfile."""
    try:
        with soundfile.SoundFile(str(path)) as audio:
            frames, channels, rate = audio.frames, audio.channels, audio.samplerate
            header = _wav_header(path) if audio.format in ("WAV", "WAVEX") else None
            if channels != 1:
                raise AudioError(f"{path}: {channels} channels; {TAKES_MONO}")
            if rate <= 0:
                raise AudioError(f"{path}: sample rate {rate} Hz")
            if frames >= UNKNOWN_FRAMES:
                raise _length_unknown(str(path))
            held, failure = (0 if decode else frames), ""
            try:
                if decode:
                    while len(block := audio.read(1 << 16)):
                        _refuse_non_finite(str(path), torch.from_numpy(block), held)
                        held += len(block)
                elif frames and audio.seekable():
                    audio.seek(frames - 1)
                    held = frames if len(audio.read(1)) == 1 else 0
            except RuntimeError as error:  # soundfile's LibsndfileError among them
                held, failure = (held if decode else 0), f" ({getattr(error, 'error_string', None) or error})"
    except AudioError:
        raise
    except READ_ERRORS as error:
        raise _unreadable(str(path), error) from None
    except UnicodeEncodeError:  # soundfile passes the name to libsndfile as UTF-8
        raise AudioError(f"{os.fsencode(path)!r}: a file name that is not UTF-8, which soundfile cannot open: "
                         "rename the file") from None
    # a sample-coded WAV's data size counts its frames; a block-coded one's truncation shows in bytes, below
    promised = max(frames, header.frames if header and header.sample_coded and header.frames else 0)
    if promised == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if held < promised:
        holds = f"the file holds {held}" if decode or not failure else "its end cannot be read"
        raise AudioError(f"{path}: truncated: the header promises {promised} samples, {holds}{failure}; "
                         "re-export or remove the file")
    if header and not header.sample_coded and header.missing_bytes:
        count = f" (of {header.frames} samples in all)" if header.frames else ""
        raise AudioError(f"{path}: truncated: the header declares {header.missing_bytes} more bytes of coded audio than "
                         f"the file holds{count}; re-export or remove the file")
    return round(held * SAMPLE_RATE / rate)


def _utf8_lines(path: Path) -> list[str]:
    """A manifest's or transcript file's lines, UTF-8 (a byte-order mark is no part of the first)."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise AudioError(f"{path}: not UTF-8 text (byte {error.start}): save it as UTF-8") from None


def read_manifest(path: Path, texts: Path | None = None, check_files: bool = True) -> list[Utterance]:
    """Rows of a fairseq manifest; ``texts`` (one line per row, e.g. a .wrd file) adds transcripts.
    ``check_files=False``: rows whose audio file is missing are kept (to be counted missing)."""
    if path.is_dir():
        raise AudioError(f"{path} is a folder: give the manifest file in it (a .tsv whose first line is the audio root)")
    if not path.is_file():
        raise AudioError(f"{path}: no such manifest")
    lines = _utf8_lines(path)
    if not lines:
        raise AudioError(f"{path}: empty manifest (the first line must be the audio root dir)")
    first = lines[0].strip()
    if "\t" in first:  # a row where the root belongs: every path would be read under "x.wav<TAB>1600/"
        raise AudioError(f"{path}:1: {first!r} is a row, not the audio root: a manifest's first line is the folder "
                         "its rows' paths are relative to (fairseq's layout); add that line")
    root = Path(first)
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise AudioError(f"{path}:{number}: expected 'relative/path<TAB>num_samples', got {line!r}")
        audio = root / parts[0]
        if check_files and not audio.is_file():
            where = "" if root.is_absolute() else (f" (the manifest's root {root} is relative: read from the current "
                                                    f"directory {Path.cwd()}, as fairseq reads it)")
            raise AudioError(f"{path}:{number}: audio file {audio} does not exist{where}")
        rows.append(Utterance(audio, int(parts[1])))
    if texts is not None:
        transcripts = _utf8_lines(texts)
        if len(transcripts) != len(rows):
            raise AudioError(f"{texts}: {len(transcripts)} transcripts for {len(rows)} manifest rows")
        for row, text in zip(rows, transcripts):
            row.text = text
    return rows


def write_manifest(path: Path, root: Path, utterances: list[Utterance]) -> None:
    """A fairseq manifest for ``utterances`` (all under ``root``), plus ``.wrd`` transcripts if any.
    The transcripts go first and the manifest appears whole (renamed into place), so a manifest on
    disk is never half written nor without the transcripts written with it."""
    lines = [str(root.resolve())] + [f"{u.path.relative_to(root)}\t{u.num_samples}" for u in utterances]
    if any(u.text for u in utterances):
        path.with_suffix(".wrd").write_text("\n".join(u.text for u in utterances) + "\n", encoding="utf-8")
    partial = partial_path(path)
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")  # as read_manifest reads it, whatever the locale
    partial.replace(path)


def manifest_from_folder(folder: Path, out: Path, on_bad: Callable[[AudioError], None] | None = None,
                         on_other: Callable[[str], None] | None = None) -> list[Utterance]:
    """Build a manifest for every audio file under ``folder`` (``python -m dyt_wav2vec2.manifest``),
    listed as every recipe lists a folder (:func:`dyt_data.files_by_suffix`: linked folders entered,
    hidden names skipped), each file decoded as training reads it (:func:`inspect_audio`), sample
    counts at 16 kHz. A bad file raises its AudioError; with ``on_bad`` it is passed there instead
    and left out, and the manifest holds the good files only; ``on_other`` is told of files of other
    kinds, in words. Returns the rows written."""
    if not folder.is_dir():
        raise AudioError(f"{folder}: no such folder")
    if not out.parent.is_dir():
        raise AudioError(f"{out}: its folder {out.parent} does not exist")
    listed = files_by_suffix(folder, AUDIO_SUFFIXES, AudioError, any_case=True)
    files = sorted(path for paths in listed.found.values() for path in paths)
    if not files:
        raise AudioError(f"{folder}: no {', '.join(AUDIO_SUFFIXES)} files"
                         + (f" (it holds {listed.other_kinds()})" if listed.other else " (hidden files and folders are not read)"))
    if (others := listed.other_kinds()) and on_other is not None:
        on_other(f"left out {others}")
    utterances = []
    for path in files:
        try:
            if any(c in str(path.relative_to(folder)) for c in "\t\n\r"):
                raise AudioError(f"{path!r}: a tab or line break in its name, which a manifest row cannot hold; rename it")
            utterances.append(Utterance(path, inspect_audio(path, decode=True)))
        except AudioError as error:
            if on_bad is None:
                raise
            on_bad(error)
    if not utterances:
        raise AudioError(f"{folder}: none of its {len(files)} audio files can be used (each is listed above)")
    write_manifest(out, folder, utterances)
    return utterances


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _hf_audio_rows(path: Path):
    """A saved HF dataset's rows with their audio undecoded, and the name of its Audio column."""
    import datasets

    rows = datasets.load_from_disk(str(path))
    if isinstance(rows, datasets.DatasetDict):
        raise AudioError(f"{path}: a DatasetDict; point at one split's folder (e.g. {path}/train)")
    column = next((name for name, kind in rows.features.items() if isinstance(kind, datasets.Audio)), None)
    if column is None:
        raise AudioError(f"{path}: no Audio column among {list(rows.features)}")
    return rows.cast_column(column, datasets.Audio(decode=False)), column


def _hf_audio_files(path: Path, rows, column: str) -> list[Path]:
    """The files a saved HF dataset's audio is read from: its own (not datasets' cache files), and the
    files of rows that hold a path without the bytes (``save_to_disk`` embeds the bytes; older saves
    may not)."""
    from dyt.train.data_files import saved_dataset_files

    external = []
    for chunk in rows.with_format("arrow")[column].chunks:
        missing = chunk.field("bytes").is_null().to_pylist()
        external += [Path(p) for gone, p in zip(missing, chunk.field("path").to_pylist()) if gone and p]
    return [*saved_dataset_files(path), *external]


def audio_source_files(path: Path) -> list[Path]:
    """Every file a manifest or saved HF dataset reads audio from (``dyt.train.data_files``): the
    manifest and the audio files it lists, or the dataset's folder."""
    if is_hf_dataset(path):
        return _hf_audio_files(path, *_hf_audio_rows(path))
    if not path.is_file():
        return [path]  # counted as missing
    return [path, *(row.path for row in read_manifest(path, check_files=False))]


def stored_check(folder: Path | None, key: object, compute: Callable[[], Any]) -> Any:
    """``compute()``'s result (JSON), stored in ``folder`` under a digest of ``key`` (what the result
    depends on) and computed once: the ranks of a launch, all asking at once, wait for the one
    computing it, and a later launch on the same files reads it. Without a folder, or with one that
    cannot be written (a read-only cache), computed every time."""
    if folder is None:
        return compute()
    result = folder / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(result) + ".lock")
        lock.acquire()
    except OSError:
        return compute()
    try:
        if result.is_file():
            return json.loads(result.read_text())
        value = compute()
        write_json(result, value)
        return value
    finally:
        lock.release()


def _version(stat: os.stat_result) -> tuple:
    """What marks a file's version in a stored check's key: inode, size and times."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


INSPECT_VERSION = 2
"""Part of the key of :func:`inspected`'s stored results: a change to :func:`inspect_audio` makes old ones stale
(2: a block-coded WAV judged truncated by its bytes; a file libsndfile cannot seek in taken at its count)."""


def file_stats(rows: list[Utterance]) -> dict[Path, os.stat_result]:
    """Each row's file's stat, taken once for the checks of a launch's set-up (:func:`inspected`,
    :func:`shared_recordings`), which would otherwise each stat every file on every rank; a file that
    cannot be stat'ed is left out (and named by the check that reads it)."""
    stats = {}
    for row in rows:
        with contextlib.suppress(OSError):
            stats[row.path] = row.path.stat()
    return stats


def inspected(rows: list[Utterance], checked: Path | None = None,
              stats: dict[Path, os.stat_result] | None = None) -> list[int | str]:
    """:func:`inspect_audio` of each row: its samples at 16 kHz, or what is wrong with it. With
    ``checked`` (a folder for results) stored once per version of the files, keyed by every file's
    path, inode, size and times: the first rank of a launch opens each file, the others and later
    launches read its result (every rank used to open every file at every start). Stored failures
    are read again (a read may fail for a passing reason: a file server's error, too many open files).
    ``stats``: the files' :func:`file_stats`, where the launch took them already."""
    def inspect(row: Utterance) -> int | str:
        try:
            return inspect_audio(row.path)
        except AudioError as error:
            return str(error)

    def inspect_all() -> list[int | str]:
        return [inspect(row) for row in rows]

    if checked is None:
        return inspect_all()
    stats = file_stats(rows) if stats is None else stats
    if any(row.path not in stats for row in rows):  # a file gone: nothing to key by; checked, and named, without storing
        return inspect_all()
    key = [INSPECT_VERSION, soundfile.__libsndfile_version__, [(str(row.path), *_version(stats[row.path])) for row in rows]]
    fresh = None

    def compute() -> list[int | str]:
        nonlocal fresh
        fresh = inspect_all()
        return fresh

    stored = stored_check(checked, key, compute)
    if fresh is not None:
        return fresh
    return [inspect(row) if isinstance(result, str) else result for row, result in zip(rows, stored)]


SHARED_CHECK_VERSION = 1
"""Part of the key of :func:`shared_recordings`' stored results: a change to the check makes old ones stale."""


def shared_recordings(train: list[Utterance], held_out: list[Utterance], checked: Path | None = None,
                      stats: dict[Path, os.stat_result] | None = None) -> list[tuple[Path, Path]]:
    """(held-out file, training file) for every held-out file that is also training audio: the same
    file (device and inode, however the path is spelled or linked), or a copy of one (the same bytes
    under another name, as a corpus copied into two folders gives). Only files whose size both lists
    hold are read, and with ``checked`` (a folder for results) once per version of the files
    (:func:`stored_check`, keyed by every file's path, inode, size and times), so a later launch, or
    another rank of this one, on the same files reads none. ``stats``: the files' :func:`file_stats`,
    where the launch took them already."""
    given = stats or {}
    stats = {row.path: given.get(row.path) or row.path.stat() for row in [*train, *held_out]}

    def identity(path: Path) -> tuple:
        stat = stats[path]  # a file system without inode numbers: the resolved path
        return (stat.st_dev, stat.st_ino) if stat.st_ino else (str(path.resolve()),)

    trained: dict[tuple, Path] = {}
    for row in train:
        trained.setdefault(identity(row.path), row.path)

    def compute() -> list[list[str]]:
        shared = [(row.path, trained[identity(row.path)]) for row in held_out if identity(row.path) in trained]
        named = {held for held, _ in shared}
        by_size: dict[int, list[Path]] = {}
        for path in trained.values():
            by_size.setdefault(stats[path].st_size, []).append(path)
        candidates = [row.path for row in held_out if row.path not in named and stats[row.path].st_size in by_size]
        digests: dict[str, Path] = {}  # of the training files of the sizes the candidates have
        for size in dict.fromkeys(stats[path].st_size for path in candidates):
            for path in by_size[size]:
                digests.setdefault(file_sha256(path), path)
        shared += [(path, digests[digest]) for path in candidates if (digest := file_sha256(path)) in digests]
        return [[str(a), str(b)] for a, b in shared]

    held = {row.path for row in held_out}
    key = [SHARED_CHECK_VERSION, sorted((str(path), *_version(stat), path in held) for path, stat in stats.items())]
    return [(Path(a), Path(b)) for a, b in stored_check(checked, key, compute)]


HF_AUDIO_VERSION = 3
"""Part of the key of :func:`utterances_from_hf_dataset`'s decoded copies: raise it when the decoding
or the written format changes, or copies made by the old code are read back (2: float wav files; 16-bit
PCM cut off every sample beyond +-1, which float audio at int16 scale is; 3: 16-bit FLAC where that
holds every sample exactly, :func:`write_decoded`)."""


def write_decoded(waveform: torch.Tensor, stem: Path) -> Path:
    """``waveform`` (16 kHz) written where :func:`load_audio` reads back the same samples, in the
    smallest such form: 16-bit FLAC when every sample is a 16-bit PCM value (k / 32768, what a 16-bit
    source decodes to: LibriSpeech's FLAC, most corpora's WAV), about a quarter of a float WAV's size
    (LibriSpeech 960 h: ~60 GB against 221); else a float WAV (resampled audio, float sources, audio
    at int16 scale). The file is ``stem`` with the suffix of its format."""
    pcm = waveform * 32768
    if bool((pcm == pcm.round()).all()) and -32768 <= pcm.min() and pcm.max() <= 32767:
        path = stem.with_suffix(".flac")
        soundfile.write(str(path), pcm.to(torch.int16).numpy(), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    else:
        path = stem.with_suffix(".wav")
        soundfile.write(str(path), waveform.numpy(), SAMPLE_RATE, subtype="FLOAT")
    return path


def _convert_hf_rows(batch: dict, indices: list[int], column: str, text_column: str, source: Path, out: Path,
                     forked: bool) -> dict:
    """``datasets.map`` worker of :func:`utterances_from_hf_dataset`: decode and write a batch of rows.
    ``forked``: in a worker process forked from one whose torch had run OpenMP threads, torch's
    first multi-threaded op waits forever (measured: a reduction in :func:`write_decoded`), so such
    a worker runs torch on one thread, as DataLoader workers do."""
    import io

    if forked:
        torch.set_num_threads(1)
    names, samples, texts, problems = [], [], [], []
    for index, audio, text in zip(indices, batch[column], batch.get(text_column, [""] * len(indices))):
        name = f"{source}[{index}]"
        data = io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio.get("path")
        try:
            if data is None:
                raise AudioError(f"{name}: neither bytes nor a path")
            waveform = load_audio(Path(data) if isinstance(data, str) else data, name)
        except AudioError as error:  # counted against data.max_bad_fraction, as a manifest's bad file is
            names.append("")
            samples.append(0)
            texts.append("")
            problems.append(str(error))
            continue
        names.append(write_decoded(waveform, out / f"{index:07d}").name)
        samples.append(waveform.numel())
        texts.append(str(text or ""))
        problems.append("")
    return {"file": names, "samples": samples, "words": texts, "problem": problems}


def utterances_from_hf_dataset(path: Path, cache: Path, text_column: str = "text",
                               num_proc: int = 1) -> tuple[list[Utterance], list[str]]:
    """The audio of a saved HF dataset, and what is wrong with each row that cannot be used (one line
    each: the audio check counts them against ``data.max_bad_fraction``, as a manifest's bad files),
    the audio written once as 16 kHz files under ``cache``
    (:func:`write_decoded`: 16-bit FLAC or float WAV, the samples as decoded), so every input takes
    the same path through the pipeline; ``num_proc`` processes decode and write (``datasets.map``).
    Keyed by the dataset's fingerprint and its files' sizes and times: a fingerprint follows the
    operations that made a dataset (for one built from file paths, the paths), not the audio, so a
    dataset rebuilt from re-recorded files keeps it. The ranks of a launch all ask at once: one
    writes the copies under a lock while the others wait, then read its manifest (written last, so a
    killed conversion is redone, never half read). What was wrong with a row is stored with the
    copies, and said again with the folder to delete for it to be decoded anew (a read that failed
    for a passing reason, a file server's error: every rank of a launch must see the same rows, so
    no rank decodes it again on its own)."""
    from dyt.train.data_files import files_signature

    rows, column = _hf_audio_rows(path)
    if len(rows) == 0:
        return [], []  # named by the audio check as a source without audio files
    files = files_signature(_hf_audio_files(path, rows, column))
    out = cache / f"v{HF_AUDIO_VERSION}-{rows._fingerprint}-{files['digest']}"
    manifest, problems_file = out / "manifest.tsv", out / "problems.json"
    with reported_as(AudioError):
        cache_folder(out.parent)
    with FileLock(str(out) + ".lock"):
        if manifest.is_file():
            words = manifest.with_suffix(".wrd")
            stored = [f"{problem} (stored by the conversion in {out}: delete that folder to decode the rows again)"
                      for problem in read_json(problems_file) or []]
            return read_manifest(manifest, words if words.is_file() else None), stored
        out.mkdir(parents=True, exist_ok=True)
        workers = min(worker_processes(num_proc, "data.num_proc"), len(rows))
        forked = workers > 1
        try:
            written = rows.map(_convert_hf_rows, batched=True, batch_size=64, with_indices=True,
                               remove_columns=rows.column_names, num_proc=workers if forked else None,
                               cache_file_name=str(out / "rows.arrow"), load_from_cache_file=False,
                               fn_kwargs={"column": column, "text_column": text_column, "source": path, "out": out,
                                          "forked": forked},
                               desc=f"decoding {path.name}")
        except BaseException:  # its copies so far would stay unread (a fixed dataset has another key)
            shutil.rmtree(out, ignore_errors=True)
            raise
        utterances = [Utterance(out / name, samples, words) for name, samples, words, problem
                      in zip(written["file"], written["samples"], written["words"], written["problem"]) if not problem]
        problems = [problem for problem in written["problem"] if problem]
        del written
        for table in out.glob("rows*.arrow"):  # map's results, read: only the audio files are kept
            table.unlink()
        write_json(problems_file, problems)  # before the manifest, which marks the conversion whole
        write_manifest(manifest, out, utterances)
        for older in range(1, HF_AUDIO_VERSION):  # this dataset's copies by older conversions: never read again
            shutil.rmtree(cache / f"v{older}-{rows._fingerprint}-{files['digest']}", ignore_errors=True)
    return utterances, problems
