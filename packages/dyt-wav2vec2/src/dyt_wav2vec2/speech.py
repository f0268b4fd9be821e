"""The built-in speech data, made from Debian packages (unpacked, not installed):

- synthetic speech from espeak-ng (English accents x voice variants, random pitch and speed) and
  flite voices, saying the Asterisk prompt sentences and 36 keywords (digits, NATO alphabet);
- real recordings: the Asterisk core sounds (one speaker, 8 kHz) of the same prompts and keywords.

Splits are by voice: a variant or flite voice is in exactly one of train / validation / test, so
evaluation voices are never heard in training. Prompt sentences are also split by text, so the
speech-recognition eval on real recordings uses sentences the model never saw transcribed.
``python -m dyt_wav2vec2.speech`` builds everything (cached, parallel, with a progress bar).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile
import torch
from filelock import FileLock

from dyt.errors import help_description, output_folder, user_errors
from dyt.train.config import AT_LEAST_ONE
from dyt_data import cache_root, reported_as, unpack

from .audio import SAMPLE_RATE, AudioError, Utterance, load_audio, read_manifest, write_manifest

PACKAGES = [
    "espeak-ng", "libespeak-ng1", "espeak-ng-data", "libpcaudio0", "libsonic0", "libpulse0", "libasyncns0",
    "flite", "libflite1", "asterisk-core-sounds-en-wav", "asterisk-core-sounds-en",
]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
FLITE_SPLITS = {"kal": "train", "awb": "train", "kal16": "train", "slt": "validation", "rms": "test"}
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NATO = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
        "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
        "xray", "yankee", "zulu"]
KEYWORDS = DIGITS + NATO
SPLITS = ("train", "validation", "test")


def package_root() -> Path:
    with reported_as(AudioError):
        return unpack(PACKAGES, "speech")


def _asterisk_dir(root: Path) -> Path:
    return root / "usr/share/asterisk/sounds/en_US_f_Allison"


def _libs(root: Path) -> dict[str, str]:
    lib = root / "usr/lib/x86_64-linux-gnu"
    return {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{lib / 'pulseaudio'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def voice_splits(root: Path) -> dict[str, list[str]]:
    """espeak voices ``accent+variant`` and ``flite:<voice>`` per split (by variant, never shared)."""
    variants = sorted(p.name for p in (root / "usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v").iterdir())
    split_of = {v: "validation" if i % 7 == 3 else "test" if i % 7 == 6 else "train" for i, v in enumerate(variants)}
    voices: dict[str, list[str]] = {s: [] for s in SPLITS}
    for variant, split in split_of.items():
        voices[split] += [f"{accent}+{variant}" for accent in ACCENTS]
    for voice, split in FLITE_SPLITS.items():
        voices[split].append(f"flite:{voice}")
    return voices


def prompts(root: Path) -> dict[str, str]:
    """Asterisk prompt name -> transcript, for prompts with a real recording and plain-word text."""
    doc = root / "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
    found = {}
    for line in gzip.open(doc, "rt", encoding="utf-8", errors="replace"):
        name, _, text = line.partition(":")
        text = normalize_text(text)
        if line.startswith(";") or not text or "[" in line or not (_asterisk_dir(root) / f"{name}.wav").is_file():
            continue
        found[name] = text
    return found


def normalize_text(text: str) -> str:
    """Lower-case words of letters and apostrophes: the transcripts CTC learns and WER scores."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split())


def synthesize(root: Path, voice: str, text: str, out: Path, rng: random.Random) -> Utterance:
    """Speak ``text`` with ``voice`` into ``out`` as 16 kHz mono."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        if voice.startswith("flite:"):
            cmd = [str(root / "usr/bin/flite"), "-voice", voice.removeprefix("flite:"), "-t", text, "-o", str(raw)]
        else:
            cmd = [str(root / "usr/bin/espeak-ng"), f"--path={root / 'usr/lib/x86_64-linux-gnu'}", "-v", voice,
                   "-p", str(rng.randint(25, 75)), "-s", str(rng.randint(130, 190)), "-w", str(raw), text]
        subprocess.run(cmd, env=_libs(root), check=True, capture_output=True)
        waveform = load_audio(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(out), waveform.numpy(), SAMPLE_RATE, subtype="PCM_16")
    return Utterance(out, waveform.numel(), text)


def _split_prompts(texts: dict[str, str]) -> dict[str, list[str]]:
    """Prompt names split by their text: 80% train, 10% validation, 10% test of the distinct
    transcripts, so prompts that say the same words (several Asterisk prompts do) share a split."""
    shuffled = sorted(set(texts.values()))
    random.Random(0).shuffle(shuffled)
    n = len(shuffled)
    split_of = {text: "train" if i < int(0.8 * n) else "validation" if i < int(0.9 * n) else "test"
                for i, text in enumerate(shuffled)}
    return {split: sorted(name for name, text in texts.items() if split_of[text] == split) for split in SPLITS}


def build(out: Path | None = None, per_split: dict[str, int] | None = None, keyword_voices: int = 40,
          workers: int | None = None) -> Path:
    """Make (or reuse) the built-in speech data; returns its dir of manifests:

    - ``sentences-{split}.tsv/.wrd``: synthetic prompt sentences (pretraining, speech recognition);
    - ``keywords-{split}.tsv/.wrd``: the 36 keywords, ``keyword_voices`` voices each in train;
    - ``real-keywords.tsv/.wrd`` and ``real-sentences-test.tsv/.wrd``: Asterisk recordings.
    """
    out = out or cache_root() / "speech"
    per_split = per_split or {"train": 2000, "validation": 200, "test": 200}
    # v2: prompts split by distinct transcript (v1 split by prompt name, and prompts saying the same
    # words leaked 6 validation and 11 test sentences into training). v3: pitch and speed drawn from
    # the file's path inside ``out`` (v2 drew them from the absolute path: each cache dir, each
    # $HOME, heard different audio).
    key = f"v3-{per_split['train']}-{per_split['validation']}-{per_split['test']}-{keyword_voices}"
    complete = out / ".complete"  # names the build the manifests hold: another size rebuilds them
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # the ranks of a launch all ask for the data at once
        if not (complete.is_file() and complete.read_text() == key):
            complete.unlink(missing_ok=True)
            _synthesize_all(out, per_split, keyword_voices, workers)
            complete.write_text(key)
    return out


def _synthesize_all(out: Path, per_split: dict[str, int], keyword_voices: int, workers: int | None) -> None:
    from tqdm.auto import tqdm

    root = package_root()
    voices, texts = voice_splits(root), prompts(root)
    sentence_split = _split_prompts(texts)
    jobs = []  # (manifest name, voice, text, wav path)
    for split in SPLITS:
        rng = random.Random(f"sentences-{split}")
        for i in range(per_split[split]):
            jobs.append((f"sentences-{split}", rng.choice(voices[split]), texts[rng.choice(sentence_split[split])],
                         out / "audio" / split / f"s{i:05d}.wav"))
        rng = random.Random(f"keywords-{split}")
        count = keyword_voices if split == "train" else max(1, keyword_voices // 4)
        for word in KEYWORDS:
            for j, voice in enumerate(rng.sample(voices[split], min(count, len(voices[split])))):
                jobs.append((f"keywords-{split}", voice, word, out / "audio" / split / f"k-{word}-{j:03d}.wav"))
    manifests: dict[str, list[Utterance]] = {}

    def run(job):
        name, voice, text, path = job
        rng = random.Random(path.relative_to(out).as_posix())
        return name, synthesize(root, voice, text, path, rng)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for name, utterance in tqdm(pool.map(run, jobs), total=len(jobs), desc="synthesizing speech"):
            manifests.setdefault(name, []).append(utterance)
    for name, utterances in manifests.items():
        write_manifest(out / f"{name}.tsv", out / "audio", utterances)
    _write_real(root, out, texts, sentence_split["test"])


def _write_real(root: Path, out: Path, texts: dict[str, str], test_prompts: list[str]) -> None:
    """Real recordings, resampled from 8 kHz to 16 kHz: the keywords and the held-out sentences."""
    sounds = _asterisk_dir(root)
    words = {**{f"digits/{i}": w for i, w in enumerate(DIGITS)},
             **{f"phonetic/{w[0]}_p": w for w in NATO}}
    for name, items in (("real-keywords", words), ("real-sentences-test", {p: texts[p] for p in test_prompts})):
        utterances = []
        for prompt, text in items.items():
            waveform = load_audio(sounds / f"{prompt}.wav")
            path = out / "audio" / "real" / f"{prompt.replace('/', '-')}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), waveform.numpy(), SAMPLE_RATE, subtype="PCM_16")
            utterances.append(Utterance(path, waveform.numel(), text))
        write_manifest(out / f"{name}.tsv", out / "audio", utterances)


def load_split(data_dir: Path, name: str) -> list[Utterance]:
    manifest = data_dir / f"{name}.tsv"
    texts = manifest.with_suffix(".wrd")
    return read_manifest(manifest, texts if texts.is_file() else None)


@user_errors("dyt_wav2vec2.speech")
def main() -> None:
    parser = argparse.ArgumentParser(prog="dyt_wav2vec2.speech", description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_folder, default=None, help="default: $DYT_CACHE/speech")
    parser.add_argument("--train", type=AT_LEAST_ONE.arg(int), default=2000, help="synthetic training sentences")
    args = parser.parse_args()
    out = build(args.out, {"train": args.train, "validation": 200, "test": 200})
    for manifest in sorted(out.glob("*.tsv")):
        rows = read_manifest(manifest)
        seconds = sum(r.num_samples for r in rows) / SAMPLE_RATE
        print(f"{manifest.name}: {len(rows)} utterances, {seconds / 60:.1f} min")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
