"""The built-in speech data, made from Debian packages (unpacked, not installed):

- synthetic speech from espeak-ng (English accents x voice variants, random pitch and speed) and
  flite voices, saying the Asterisk prompt sentences and 36 keywords (digits, NATO alphabet);
- real recordings: the Asterisk core sounds (one speaker, 8 kHz) of the same prompts and keywords.

Splits are by voice family: espeak-ng ships near-copies of its variants (``Gene2`` is ``Gene`` at
another pitch, ``klatt2``-``klatt6`` are ``klatt``, ``max`` is ``RicishayMax`` without echo), so
variants that share a name stem or most of their settings form one family, and a family or flite
voice is in exactly one of train / validation / test: evaluation voices are never heard in training,
nor near-copies of them. Prompt sentences are split by text, with near-identical transcripts
("user will join the conference" / "users will ...") kept in one split, so the speech-recognition
evals use sentences the model never saw transcribed. The voices and prompts the recipes' settings
were chosen on (:data:`CHOSEN_ON_VARIANTS`, :data:`CHOSEN_ON_PROMPTS`) are never in test.
``python -m dyt_wav2vec2.speech`` builds everything (cached, parallel, with a progress bar).
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import hashlib
import itertools
import os
import random
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile
import torch
from filelock import FileLock

from dyt.errors import CommandParser, help_description, output_folder, user_errors
from dyt.train.config import AT_LEAST_ONE
from dyt.train.jsonio import partial_path
from dyt_data import cache_folder, cache_root, reported_as, unpack, unpacked_root, unpacked_versions

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
BUILD_VERSION = "v6"
"""Changes whenever the built-in speech does (its voices, texts or splits): runs record it
(``SpeechDataConfig.builtin_version``), so a run trained on an older build is not resumed or
reported beside runs on this one."""


def package_root() -> Path:
    with reported_as(AudioError):
        return unpack(PACKAGES, "speech")


def _asterisk_dir(root: Path) -> Path:
    return root / "usr/share/asterisk/sounds/en_US_f_Allison"


def _libs(root: Path) -> dict[str, str]:
    lib = root / "usr/lib/x86_64-linux-gnu"
    return {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{lib / 'pulseaudio'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}  # of prompt transcripts
VOICE_SHARES = {"train": 5 / 7, "validation": 1 / 7, "test": 1 / 7}  # of espeak-ng variants
SAME_VOICE = 0.7  # share of two variants' settings that are equal when they are one voice family
SAME_SENTENCE = 0.8  # difflib's similarity of two transcripts that are one sentence family
# Every shipped setting of the wav2vec 2.0 recipes (tiny's lr, steps and input DyT's alpha0; the CTC
# fine-tuning's schedule and steps) was chosen on the validation split of builds v2-v3 (534f807: every
# 7th variant from the 4th, the shuffled transcripts' 80-90%). Their voice variants and prompts are kept
# out of test, where they would make "unseen" figures in-sample (v4-v5 had 2 of those variants and 6 of
# those prompts in test).
CHOSEN_ON_VARIANTS = frozenset({
    "Andy", "Gene2", "Michael", "Storm", "antonio", "david", "f4", "iven2", "klatt3", "m3", "max", "quincy",
    "robosoft5", "steph2"})
CHOSEN_ON_PROMPTS = frozenset({
    "agent-incorrect", "conf-adminmenu", "conf-adminmenu-162", "conf-extended", "conf-now-muted",
    "conf-placeintoconf", "conf-roll-callcomplete", "conf-userswilljoin", "confbridge-binaural-off",
    "confbridge-mute-extended", "demo-echotest", "dictate/truncating_audio", "digits/billion", "digits/h-40",
    "digits/h-70", "digits/h-80", "digits/h-billion", "digits/mon-2", "digits/mon-6", "digits/yesterday",
    "dir-instr", "letters/a", "letters/ascii124", "letters/ascii41", "letters/o", "letters/s", "location",
    "pbx-invalidpark", "phonetic/c_p", "phonetic/g_p", "queue-quantity2", "queue-reporthold", "queue-youarenext",
    "silence/10", "silence/2", "silence/3", "silence/4", "silence/5", "silence/6", "silence/7", "silence/8",
    "silence/9", "speed-dial", "to-extension", "to-rerecord-it", "vm-Urgent", "vm-advopts", "vm-invalid-password",
    "vm-last", "vm-leavemsg", "vm-msginstruct", "vm-nonumber", "vm-rec-unv", "vm-star-cancel", "vm-tempgreeting2",
    "vm-toenternumber", "vm-toforward", "with"})
# Lines of a variant file that do not make its voice: the build draws each utterance's pitch itself.
NOT_VOICE_SETTINGS = {"name", "language", "pitch", "echo"}


def _families(items: Iterable[str], same: Callable[[str, str], bool]) -> list[list[str]]:
    """``items`` grouped into the connected components of ``same`` (each sorted, then sorted by
    their first item)."""
    items = sorted(items)
    parent = {item: item for item in items}

    def root(item: str) -> str:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for a, b in itertools.combinations(items, 2):
        if root(a) != root(b) and same(a, b):
            parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for item in items:
        groups.setdefault(root(item), []).append(item)
    return sorted(groups.values())


def _split_families(families: list[list[str]], shares: dict[str, float],
                    chosen_on: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Whole families to splits, each to the split that would be least over its share of members
    with the family added, in an order fixed by a hash of each family's first member (alphabetical
    order would hold out, say, every voice whose name starts with a capital). A family with a member
    in ``chosen_on`` (data settings were chosen on) goes to any split but test."""
    split: dict[str, list[str]] = {name: [] for name in shares}
    for family in sorted(families, key=lambda f: hashlib.sha256(f[0].encode()).hexdigest()):
        allowed = [s for s in shares if s != "test"] if chosen_on.intersection(family) else list(shares)
        name = min(allowed, key=lambda s: (len(split[s]) + len(family)) / shares[s])
        split[name] += family
    return {name: sorted(members) for name, members in split.items()}


def variant_settings(path: Path) -> dict[tuple[str, ...], tuple[str, ...]]:
    """The settings that shape an espeak-ng variant's voice, keyed by setting (and formant or tone
    number): comments and :data:`NOT_VOICE_SETTINGS` dropped; ``klatt N`` kept as "klatt" (N picks a
    version of the one Klatt synthesiser)."""
    settings: dict[tuple[str, ...], tuple[str, ...]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        words = line.split("//")[0].split("#")[0].split()
        if not words or words[0].lower() in NOT_VOICE_SETTINGS:
            continue
        key = words[0].lower()
        if key == "klatt":
            settings[(key,)] = ()
        else:
            settings[(key, words[1]) if key in ("formant", "tone") and len(words) > 1 else (key,)] = tuple(words[1:])
    return settings


def voice_families(root: Path) -> list[list[str]]:
    """espeak-ng's variants grouped into voices: two variants are one family when their names differ
    only in case and trailing digits (``iven``, ``iven2``) or at least :data:`SAME_VOICE` of their
    settings (:func:`variant_settings`) are equal (``RicishayMax`` and ``max``, ``john`` and
    ``Mr serious``), and so is everything linked to them."""
    folder = root / "usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v"
    settings = {p.name: variant_settings(p) for p in folder.iterdir()}

    def stem(name: str) -> str:
        return re.sub(r"\d+$", "", name.lower())

    def same(a: str, b: str) -> bool:
        keys = settings[a].keys() | settings[b].keys()
        equal = sum(settings[a].get(k) == settings[b].get(k) for k in keys)
        return stem(a) == stem(b) or not keys or equal >= SAME_VOICE * len(keys)

    return _families(settings, same)


def voice_splits(root: Path) -> dict[str, list[str]]:
    """espeak voices ``accent+variant`` and ``flite:<voice>`` per split: a voice family
    (:func:`voice_families`) in all its accents, or a flite voice, is in one split only."""
    variants = _split_families(voice_families(root), VOICE_SHARES, CHOSEN_ON_VARIANTS)
    voices = {split: [f"{accent}+{variant}" for variant in variants[split] for accent in ACCENTS] for split in SPLITS}
    for voice, split in FLITE_SPLITS.items():
        voices[split].append(f"flite:{voice}")
    return voices


def prompts(root: Path) -> dict[str, str]:
    """Asterisk prompt name -> transcript, for prompts with a real recording whose text can be
    written as the words said (:func:`spoken_text`)."""
    doc = root / "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
    found = {}
    for line in gzip.open(doc, "rt", encoding="utf-8", errors="replace"):
        name, _, text = line.partition(":")
        if line.startswith(";") or "[" in line or not (_asterisk_dir(root) / f"{name}.wav").is_file():
            continue
        if text := spoken_text(text):
            found[name] = text
    return found


SPOKEN_SYMBOLS = {**{str(digit): word for digit, word in enumerate(DIGITS)}, "*": "star", "#": "pound"}
"""How the recordings say the keypad's keys: "press 1", "press * to toggle pause", "followed by #"."""


def spoken_text(text: str) -> str | None:
    """A prompt's documented text as the words its recording says: notes in parentheses dropped
    ("IAX (note: does not say "2")", "(simple tone sound plays)", "(10 seconds of silence)": said
    nothing), a key named by its digit or symbol spelled out (:data:`SPOKEN_SYMBOLS`), then
    :func:`normalize_text`. None where the text is nothing said, or holds a number or code whose
    reading the text does not give ("3D audio", "H.323")."""
    text = re.sub(r"\([^)]*\)?", " ", text)
    words = [SPOKEN_SYMBOLS.get(word.rstrip(".,;:!?"), word) for word in re.sub(r"([*#])", r" \1 ", text).split()]
    if any(char.isdigit() for word in words for char in word):
        return None
    return normalize_text(" ".join(words)) or None


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
    _write_wav(out, waveform)
    return Utterance(out, waveform.numel(), text)


def _write_wav(path: Path, waveform: torch.Tensor) -> None:
    """16-bit PCM at ``path``, renamed into place: a build for another size rewrites the folder's files
    while jobs on an earlier build may still read them, and they must never read one half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)  # not *.wav: a folder scan for audio never takes one left by a kill
    soundfile.write(str(partial), waveform.numpy(), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    partial.replace(path)


def sentence_similarity(a: str, b: str) -> float:
    """How far two transcripts' characters match: difflib's ratio, the larger of its two argument
    orders (it is not symmetric)."""
    return max(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(),
               difflib.SequenceMatcher(None, b, a, autojunk=False).ratio())


def sentence_families(transcripts: Iterable[str]) -> list[list[str]]:
    """Distinct transcripts grouped by near-identity: two whose characters match to at least
    :data:`SAME_SENTENCE` (:func:`sentence_similarity`: "the conference is now muted" / "... unmuted",
    "please enter your password ..." / "please re enter your password ...") are one family, and so
    is everything linked to them."""
    def same(a: str, b: str) -> bool:
        quick = difflib.SequenceMatcher(None, a, b, autojunk=False)  # bounds on the ratio, either order
        return (quick.real_quick_ratio() >= SAME_SENTENCE and quick.quick_ratio() >= SAME_SENTENCE
                and sentence_similarity(a, b) >= SAME_SENTENCE)

    return _families(set(transcripts), same)


def _split_prompts(texts: dict[str, str]) -> dict[str, list[str]]:
    """Prompt names split by their text: 80% train, 10% validation, 10% test of the distinct
    transcripts, a family of near-identical ones (:func:`sentence_families`) in one split, so
    prompts that say the same or nearly the same words (several Asterisk prompts do) share a split."""
    chosen_on = frozenset(text for name, text in texts.items() if name in CHOSEN_ON_PROMPTS)
    split_of = {text: split for split, members in
                _split_families(sentence_families(texts.values()), SHARES, chosen_on).items()
                for text in members}
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
    # $HOME, heard different audio). v4: voices split by family and transcripts by near-identity
    # (v3 held out near-copies of training variants and sentences one word from training ones).
    # v5: transcripts as the recordings say them (v4 dropped the keys of "press 1", "press *" and kept
    # parenthesised notes: "iax note does not say", "seconds of silence" for a silent prompt).
    # Then the unpacked packages' versions: the voices (so the splits) and recordings come from them.
    build = f"{BUILD_VERSION}-{per_split['train']}-{per_split['validation']}-{per_split['test']}-{keyword_voices}"

    def key(root: Path) -> str:
        return f"{build}-{hashlib.sha256(' '.join(unpacked_versions(root)).encode()).hexdigest()[:12]}"

    complete = out / ".complete"  # names the build the manifests hold: another size rebuilds them
    with reported_as(AudioError):
        cache_folder(out.parent)
    with FileLock(str(out) + ".lock"):  # the ranks of a launch all ask for the data at once
        done = complete.read_text() if complete.is_file() else ""
        unpacked = unpacked_root("speech")  # none (deleted since the build): the build stands, no download
        if done.startswith(f"{build}-") and (unpacked is None or done == key(unpacked)):
            return out
        complete.unlink(missing_ok=True)
        with reported_as(AudioError, out):  # a full disk: one line
            _synthesize_all(out, per_split, keyword_voices, workers)
            complete.write_text(key(package_root()))
    return out


def _synthesize_all(out: Path, per_split: dict[str, int], keyword_voices: int, workers: int | None) -> None:
    from tqdm.auto import tqdm

    root = package_root()
    voices, texts = voice_splits(root), prompts(root)
    sentence_split = _split_prompts(texts)
    for split in SPLITS:  # a Debian package that shrank would leave a split nothing to say or no one to say it
        if not voices[split] or not sentence_split[split]:
            raise AudioError(f"the speech packages in {root} give the {split} split no "
                             f"{'voices' if not voices[split] else 'prompt sentences'}: rebuild them (delete the folder)")
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
            _write_wav(path, waveform)
            utterances.append(Utterance(path, waveform.numel(), text))
        write_manifest(out / f"{name}.tsv", out / "audio", utterances)


def speech_identity(folder: Path) -> str:
    """What the speech in ``folder`` is, for stored evals' settings (a rebuilt folder's evals are made
    again, not reused): the built-in build's key (its ``.complete``: the build's version and sizes, the
    voice and recording packages' versions), or, for another folder, a digest of its manifests and
    transcripts (which name every file and its length, not the audio's samples)."""
    complete = folder / ".complete"
    if complete.is_file():
        return complete.read_text().strip()
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("*.tsv"), *folder.glob("*.wrd")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"manifests-{digest.hexdigest()[:16]}"


def load_split(data_dir: Path, name: str) -> list[Utterance]:
    manifest = data_dir / f"{name}.tsv"
    texts = manifest.with_suffix(".wrd")
    return read_manifest(manifest, texts if texts.is_file() else None)


@user_errors("dyt_wav2vec2.speech")
def main() -> None:
    parser = CommandParser(prog="dyt_wav2vec2.speech", description=help_description(__doc__),
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
