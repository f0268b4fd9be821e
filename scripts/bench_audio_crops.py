"""One wav2vec 2.0 pretraining batch collated from long recordings: each file decoded whole (what
the batches did before 2026-12-08) against :class:`dyt_wav2vec2.audio.AudioClip`, which reads a
16 kHz WAV / FLAC / AIFF file for its crop alone. Both are timed in interleaved rounds in one
process (median), then the peak memory one batch's reading allocates is traced (tracemalloc,
which sees soundfile's numpy buffers, not torch's own allocations such as a resampling's), and the
two batches of every round are checked to be the same tensor.

Without ``--file`` it writes a 10-minute 16 kHz recording (a gliding tone with noise) as 16-bit
FLAC and WAV in a temporary folder and times each.

    python scripts/bench_audio_crops.py [--file long.flac ...] [--clips 8] [--crop 32000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import soundfile
import torch

from dyt.bench import count_arg
from dyt.errors import help_description
from dyt_wav2vec2.audio import SAMPLE_RATE, AudioClip, load_audio
from dyt_wav2vec2.task import crop_to_shortest


def long_recordings(folder: Path, minutes: float) -> list[Path]:
    """A gliding tone with noise, ``minutes`` long at 16 kHz, as 16-bit FLAC and WAV."""
    t = np.arange(int(SAMPLE_RATE * 60 * minutes)) / SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(t)) * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    paths = [folder / "long.flac", folder / "long.wav"]
    for path in paths:
        soundfile.write(path, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    return paths


def collate(path: Path, clips: int, crop: int, whole: bool, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    waves = [load_audio(path) if whole else AudioClip(path) for _ in range(clips)]
    return crop_to_shortest(waves, crop)[0]


def measure(path: Path, clips: int, crop: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per way of reading: (median ms a batch, peak MiB one batch allocates). The rounds are timed
    without tracemalloc (it slows every allocation); one more batch each way is then traced."""
    ways = {"decoded whole": True, "read for the crop": False}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_index in range(rounds):
        batches = {}
        for name in (list(ways) if round_index % 2 else list(ways)[::-1]):
            start = time.perf_counter()
            batches[name] = collate(path, clips, crop, ways[name], round_index)
            times[name].append((time.perf_counter() - start) * 1e3)
        if not torch.equal(*batches.values()):
            raise SystemExit(f"bench_audio_crops.py: {path}: the two batches of round {round_index} differ")
    peaks = {}
    for name, whole in ways.items():
        tracemalloc.start()
        collate(path, clips, crop, whole, 0)
        peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return {name: (statistics.median(values), peaks[name]) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", dest="files", action="append", type=Path,
                        help="a recording to crop, repeatable (default: a 10-minute FLAC and WAV written here)")
    parser.add_argument("--clips", type=count_arg(1), default=8, help="clips a batch (default 8)")
    parser.add_argument("--crop", type=count_arg(1), default=32000, help="samples a crop (default 32000)")
    parser.add_argument("--rounds", type=count_arg(1), default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for path in args.files or long_recordings(Path(folder), 10):
            info = soundfile.info(str(path))
            results = measure(path, args.clips, args.crop, args.rounds)
            print(f"{path.name}: {info.frames / info.samplerate:.0f} s at {info.samplerate} Hz, "
                  f"{path.stat().st_size / 2**20:.1f} MiB; {args.clips} clips of {args.crop} samples, "
                  f"median of {args.rounds} interleaved rounds; the batches equal")
            whole = results["decoded whole"][0]
            for name, (ms, peak) in results.items():
                print(f"  {name:18s} {ms:9.2f} ms  {ms / whole:6.3f} x whole  peak {peak:8.1f} MiB")


if __name__ == "__main__":
    main()
