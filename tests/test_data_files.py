"""A run's record of the user's data files (dyt.train.data_files): what changes it, what each recipe
names, and the decoded-audio cache of a saved HF dataset, which must follow the audio, not the
dataset's fingerprint."""

import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from dyt.train import ConfigError
from dyt.train.data_files import check_data_unchanged, data_files_of, files_signature, record_data_files


def _corpus(root):
    for name, text in (("a/one.txt", "one two three\n"), ("b/two.txt", "four five\n")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _manifest(root):
    """An audio folder of two short wav files and a manifest listing both."""
    audio = root / "audio"
    audio.mkdir()
    for name in ("x.wav", "y.wav"):
        soundfile.write(str(audio / name), np.zeros(1600, dtype=np.float32), 16000)
    manifest = root / "train.tsv"
    manifest.write_text(f"{audio}\nx.wav\t1600\ny.wav\t1600\n")
    return audio, manifest


def test_the_signature_changes_with_any_file_and_only_then(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    before = files_signature([corpus])
    assert before == files_signature([corpus]) and (before["files"], before["bytes"]) == (2, 24)
    changes = {
        "added": lambda: (corpus / "b/three.txt").write_text("six\n"),
        "removed": lambda: (corpus / "b/three.txt").unlink(),
        "rewritten, same size": lambda: (corpus / "a/one.txt").write_text("ONE TWO THREE\n"),
        "touched": lambda: os.utime(corpus / "b/two.txt", ns=(0, time.time_ns() + 10**9)),
    }
    for what, change in changes.items():
        last = files_signature([corpus])
        change()
        assert files_signature([corpus])["digest"] != last["digest"], what
    missing = files_signature([tmp_path / "nowhere"])
    assert missing["files"] == 0 and missing["digest"] != files_signature([])["digest"]


def test_a_run_refuses_data_files_that_changed(tmp_path):
    from dyt_llama.task import LlamaConfig

    corpus = _corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    run.mkdir()
    config = LlamaConfig()
    config.data.corpus = str(corpus)
    record_data_files(config, run)
    check_data_unchanged(run, data_files_of(config))  # the same files: nothing to say
    (corpus / "a/one.txt").write_text("other words entirely\n")
    with pytest.raises(ConfigError, match=r"changed since \(.*touched; 2 files, 0.0 MB then, 2 files, 0.0 MB now\)"):
        check_data_unchanged(run, data_files_of(config))
    with pytest.raises(ConfigError, match="the built-in data now"):
        check_data_unchanged(run, data_files_of(LlamaConfig()))
    record_data_files(LlamaConfig(), run)  # built-in data: no record, nothing to compare
    assert not (run / "data_files.json").exists()
    check_data_unchanged(run, data_files_of(config))
    (run / "data_files.json").write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        check_data_unchanged(run, data_files_of(config))


def test_a_run_on_another_build_of_the_builtin_speech_is_refused(tmp_path, monkeypatch):
    """The built-in speech changed its split (v4: voice families; v3's held-out voices and sentences
    are v4's training ones, and the reverse): a run trained on an older build must not be resumed or
    reported beside runs on this one, nor one trained before builds were recorded."""
    import dyt_wav2vec2.task as task
    from dyt_wav2vec2.task import SpeechDataConfig, Wav2Vec2PretrainConfig

    run = tmp_path / "run"
    run.mkdir()
    config = Wav2Vec2PretrainConfig()
    with pytest.raises(ConfigError, match="before its build was recorded.*built-in speech v"):
        check_data_unchanged(run, data_files_of(config))  # a run from before the record
    record_data_files(config, run)
    check_data_unchanged(run, data_files_of(config))  # the same build: nothing to say
    monkeypatch.setattr(task, "BUILD_VERSION", "v999")
    with pytest.raises(ConfigError, match=r"changed since \(.*built-in speech v\d+ then, built-in speech v999 now\)"):
        check_data_unchanged(run, data_files_of(config))
    audio, manifest = _manifest(tmp_path)
    assert SpeechDataConfig(train_manifest=str(manifest), validation_manifest=str(manifest)).builtin_version() is None


def test_each_recipe_names_the_files_it_reads(tmp_path):
    from dyt_dna.data import DnaDataConfig
    from dyt_llama.data import DataConfig
    from dyt_wav2vec2.task import SpeechDataConfig

    assert DataConfig().source_files() == [] and DnaDataConfig().source_files() == []
    assert SpeechDataConfig().source_files() == []
    assert [str(p) for p in DataConfig(corpus="c", tokenizer_file="t.json").source_files()] == ["c", "t.json"]
    assert [str(p) for p in DnaDataConfig(fasta=["a.fa"], validation_fasta=["b.fa"]).source_files()] == ["a.fa", "b.fa"]
    audio, manifest = _manifest(tmp_path)
    named = SpeechDataConfig(train_manifest=str(manifest), validation_manifest=str(manifest)).source_files()
    assert named == [manifest, audio / "x.wav", audio / "y.wav"] * 2  # the manifests and every file they list


def test_a_saved_audio_dataset_rebuilt_from_rewritten_files_is_decoded_again(tmp_path):
    """A dataset made from file paths keeps its fingerprint when the files are re-recorded and it is
    saved again (datasets fingerprints the paths): the decoded-audio cache must still follow the audio."""
    datasets = pytest.importorskip("datasets")
    from dyt_wav2vec2.audio import utterances_from_hf_dataset

    audio = tmp_path / "audio"
    audio.mkdir()
    paths = [str(audio / f"{i}.wav") for i in range(2)]

    def save(level: float):
        for path in paths:
            soundfile.write(path, np.full(8000, level, dtype=np.float32), 16000, subtype="FLOAT")
        rows = datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio())
        rows.save_to_disk(str(tmp_path / "saved"))
        return datasets.load_from_disk(str(tmp_path / "saved"))._fingerprint

    cache = tmp_path / "cache"
    first_fingerprint = save(0.25)
    first, problems = utterances_from_hf_dataset(tmp_path / "saved", cache)
    assert soundfile.read(str(first[0].path))[0].mean() == pytest.approx(0.25, abs=1e-3) and problems == []
    assert save(-0.5) == first_fingerprint  # the fingerprint did not see the new audio
    second, _ = utterances_from_hf_dataset(tmp_path / "saved", cache)
    assert second[0].path.parent != first[0].path.parent
    assert soundfile.read(str(second[0].path))[0].mean() == pytest.approx(-0.5, abs=1e-3)
    assert utterances_from_hf_dataset(tmp_path / "saved", cache)[0][0].path == second[0].path  # and is reused
    save(3.0)  # float audio beyond +-1 (saved at int16 scale): kept as decoded (16-bit copies clipped it to 1)
    loud, _ = utterances_from_hf_dataset(tmp_path / "saved", cache)
    assert soundfile.read(str(loud[0].path))[0].mean() == pytest.approx(3.0, abs=1e-3)


def test_decoded_audio_is_written_small_where_that_loses_no_sample(tmp_path):
    """16-bit PCM values (k / 32768, from -1 to 1 - 1/32768) go to 16-bit FLAC; anything else (a
    resampled or float source, a sample of 1.0) to a float WAV; either reads back bit for bit."""
    from dyt_wav2vec2.audio import load_audio, write_decoded

    pcm = torch.from_numpy(np.random.default_rng(0).integers(-32768, 32768, 16000).astype(np.float32)) / 32768
    pcm[:2] = torch.tensor([-1.0, 32767 / 32768])
    for name, wave, suffix in [("pcm", pcm, ".flac"), ("float", pcm + 1e-6, ".wav"),
                               ("one", torch.cat([pcm, torch.ones(1)]), ".wav")]:
        path = write_decoded(wave, tmp_path / name)
        assert path.suffix == suffix and torch.equal(load_audio(path), wave), name


def test_hf_audio_decoded_by_several_processes_is_what_one_writes(tmp_path, monkeypatch):
    """``num_proc`` processes write the same copies, texts and sample counts as one; a bad row is
    named, for the audio check to count (it stopped the run, whatever data.max_bad_fraction allowed);
    the cache keeps the audio and the manifest, not map's tables.
    The workers are forked after this process's torch has run OpenMP threads, as a training rank's
    has: without the worker's one-thread setting the first reduction in a worker waited forever."""
    datasets = pytest.importorskip("datasets")
    import dyt_wav2vec2.audio as audio_module
    from dyt_wav2vec2.audio import load_audio, utterances_from_hf_dataset

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.ones(1 << 22).sum() == 1 << 22  # a reduction large enough to run on the threads
    finally:
        torch.set_num_threads(threads)

    rng, paths = np.random.default_rng(0), []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.flac"))
        soundfile.write(paths[-1], rng.integers(-32768, 32768, 8000 + i, dtype=np.int16), 16000, format="FLAC")
    datasets.Dataset.from_dict({"audio": paths, "text": [f"row {i}" for i in range(5)]}).cast_column(
        "audio", datasets.Audio()).save_to_disk(str(tmp_path / "saved"))
    one, _ = utterances_from_hf_dataset(tmp_path / "saved", tmp_path / "one")
    writers = tmp_path / "writers"
    writers.mkdir()

    def write_decoded(waveform, stem, write=audio_module.write_decoded):  # the processes that write
        (writers / str(os.getpid())).touch()
        return write(waveform, stem)

    monkeypatch.setattr(audio_module, "write_decoded", write_decoded)
    two, _ = utterances_from_hf_dataset(tmp_path / "saved", tmp_path / "two", num_proc=2)
    assert len({p.name for p in writers.iterdir()} - {str(os.getpid())}) == 2
    assert [(u.num_samples, u.text) for u in two] == [(u.num_samples, u.text) for u in one] == [
        (8000 + i, f"row {i}") for i in range(5)]
    for a, b, source in zip(one, two, paths):
        assert torch.equal(load_audio(b.path), load_audio(Path(source))) and torch.equal(load_audio(a.path), load_audio(b.path))
    assert sorted(p.suffix for p in two[0].path.parent.iterdir()) == [".flac"] * 5 + [".json", ".tsv", ".wrd"]
    datasets.Dataset.from_dict({"audio": [{"bytes": b"not audio", "path": None}] * 3}).cast_column(
        "audio", datasets.Audio(decode=False)).save_to_disk(str(tmp_path / "bad"))
    for num_proc in (1, 2):
        rows, problems = utterances_from_hf_dataset(tmp_path / "bad", tmp_path / f"bad-{num_proc}", num_proc=num_proc)
        assert rows == [] and [re.sub(r" \(.*", "", p) for p in problems] == [
            f"{tmp_path / 'bad'}[{i}]: unreadable audio" for i in range(3)]
        stored = utterances_from_hf_dataset(tmp_path / "bad", tmp_path / f"bad-{num_proc}")
        assert stored[0] == [] and [p.split(" (stored by the conversion in ")[0] for p in stored[1]] == problems


def test_decoded_hf_audio_follows_the_conversion_version_and_ranks_wait_for_one_writer(tmp_path, monkeypatch):
    """The decoded copies are keyed by the conversion's version too (a changed decoder must not read
    the old copies back), and the ranks of a launch, all asking at once, wait for the one writing them."""
    datasets = pytest.importorskip("datasets")
    from filelock import FileLock

    import dyt_wav2vec2.audio as audio_module

    paths = [str(tmp_path / f"{i}.wav") for i in range(2)]
    for path in paths:
        soundfile.write(path, np.full(8000, 0.25, dtype=np.float32), 16000)
    datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio()).save_to_disk(
        str(tmp_path / "saved"))
    cache = tmp_path / "cache"
    first, _ = audio_module.utterances_from_hf_dataset(tmp_path / "saved", cache)
    monkeypatch.setattr(audio_module, "HF_AUDIO_VERSION", audio_module.HF_AUDIO_VERSION + 1)
    folder = audio_module.utterances_from_hf_dataset(tmp_path / "saved", cache)[0][0].path.parent
    assert folder != first[0].path.parent  # decoded anew
    assert not first[0].path.parent.exists()  # and the older conversion's copies, never read again, removed

    other = tmp_path / "other-cache"  # the same key in a fresh cache, its lock held as a writing rank holds it
    other.mkdir()
    built = {}
    rank = threading.Thread(target=lambda: built.update(
        rows=audio_module.utterances_from_hf_dataset(tmp_path / "saved", other)), daemon=True)
    with FileLock(str(other / folder.name) + ".lock"):
        rank.start()
        rank.join(timeout=3)  # unlocked, two short files decode in well under a second
        assert rank.is_alive() and not list(other.glob("*/manifest.tsv"))
    rank.join(timeout=60)
    assert [u.num_samples for u in built["rows"][0]] == [8000, 8000]


def test_a_stored_dna_eval_follows_its_task_folder(tmp_path):
    """dyt-dna-compare keeps each task's signature (its examples as loaded) in its stored evals'
    settings, so a stored eval is reused only while the task's examples are as they were: a folder's
    files, a built-in task's windows and labels, a GenomicBenchmarks folder's validation draw."""
    import datasets

    from dyt_dna.data import ClassificationData, load_task
    from dyt_dna.eval import task_signature

    folder = tmp_path / "mytask"
    folder.mkdir()
    for split in ("train", "dev", "test"):
        (folder / f"{split}.csv").write_text("sequence,label\nACGTACGT,a\nTTGGCCAA,b\nACGTTTGG,a\n")
    before = task_signature(load_task(str(folder), 8, 4), builtin=False)
    assert before == task_signature(load_task(str(folder), 8, 4), builtin=False) and before["task"] == "mytask"
    (folder / "train.csv").write_text("sequence,label\nACGTACGT,b\nTTGGCCAA,a\nACGTTTGG,b\n")  # labels swapped
    assert task_signature(load_task(str(folder), 8, 4), builtin=False) != before

    def task(labels, validation=("ACGT", "TTGG")):  # a built-in task: new genomes, windowing or gene calls
        split = datasets.Dataset.from_dict({"sequence": ["ACGT", "TTGG"], "label": labels})
        held = datasets.Dataset.from_dict({"sequence": list(validation), "label": labels})
        return ClassificationData("coding", ["coding", "non-coding"], split, held, split, "note")

    first = task_signature(task([0, 1]), builtin=True)
    assert first == task_signature(task([0, 1]), builtin=True) and first["builtin"] == "coding"  # as stored before
    assert task_signature(task([1, 0]), builtin=True) != first  # other gene calls, other labels
    assert task_signature(task([0, 1], validation=("TTGG", "ACGT")), builtin=True) != first  # another validation draw


def test_what_the_recipe_does_not_read_is_not_its_data(tmp_path, monkeypatch):
    """A cache or a note put inside the corpus folder, or datasets' cache files beside a saved
    dataset, are not the run's data: adding them refuses no resume. A path not found from the working
    directory (a relative path, another folder) is named as such."""
    import datasets

    from dyt_llama.data import DataConfig

    corpus = _corpus(tmp_path / "corpus")
    config = DataConfig(corpus=str(corpus))
    before = files_signature(config.source_files())
    (corpus / "NOTES.md").write_text("not a document\n")
    (corpus / ".cache" / "tokens").mkdir(parents=True)
    (corpus / ".cache" / "tokens" / "shard.bin").write_bytes(b"\0" * 64)
    assert files_signature(config.source_files()) == before
    (corpus / "b" / "three.txt").write_text("a document\n")
    assert files_signature(config.source_files()) != before
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"title": ["t"], "text": ["x"]}).save_to_disk(str(saved))
    config = DataConfig(corpus=str(saved))
    before = files_signature(config.source_files())
    (saved / "cache-0123abcd.arrow").write_bytes(b"\0" * 64)  # what datasets' filter writes there
    assert files_signature(config.source_files()) == before
    from dyt_llama.task import LlamaConfig

    relative = LlamaConfig()
    relative.data.corpus = "corpus"
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    record_data_files(relative, run)
    assert (run / "data_files.json").is_file()
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match=r"1 path\(s\) not found from .*run"):
        check_data_unchanged(run, data_files_of(relative))


def test_a_manifest_with_a_missing_file_or_a_partial_record(tmp_path):
    """A manifest whose audio file went missing counts it missing (the data changed), rather than
    failing before the check can say so; a record without its counts is 'damaged', in one line."""
    from dyt_wav2vec2.task import SpeechDataConfig

    audio, manifest = _manifest(tmp_path)
    config = SpeechDataConfig(train_manifest=str(manifest), validation_manifest=str(manifest))
    before = files_signature(config.source_files())
    (audio / "y.wav").unlink()
    after = files_signature(config.source_files())
    assert (after["files"], after["missing"]) == (4, 2) and after["digest"] != before["digest"]
    assert files_signature(SpeechDataConfig(train_manifest=str(tmp_path / "none.tsv")).source_files())["missing"] == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "data_files.json").write_text('{"digest": "0123456789abcdef"}')
    with pytest.raises(ConfigError, match="damaged"):
        check_data_unchanged(run, before)


def test_a_manifest_is_read_as_utf8_with_or_without_a_bom(tmp_path, monkeypatch):
    """A BOM (Windows editors write one) was read as part of the root folder's name, so every file
    'did not exist' under a path with an invisible first character; other bytes were a traceback."""
    from dyt_wav2vec2.audio import AudioError, read_manifest

    soundfile.write(str(tmp_path / "a.wav"), np.zeros(1600, dtype=np.float32), 16000)
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"\ufeff{tmp_path}\na.wav\t1600\n", encoding="utf-8")
    assert [u.path for u in read_manifest(manifest)] == [tmp_path / "a.wav"]
    manifest.write_bytes(f"{tmp_path}\nd\xe9j\xe0.wav\t1600\n".encode("latin-1"))
    with pytest.raises(AudioError, match=r"train.tsv: not UTF-8 text \(byte \d+\): save it as UTF-8"):
        read_manifest(manifest)
    monkeypatch.chdir(tmp_path)  # a relative root is read from the current directory, as fairseq reads it
    manifest.write_text("audio\na.wav\t1600\n")
    with pytest.raises(AudioError, match=rf"audio file audio/a.wav does not exist \(the manifest's root audio is "
                                         rf"relative: read from the current directory {tmp_path}"):
        read_manifest(manifest)


def test_an_audio_file_name_that_is_not_utf8_is_an_audio_error(tmp_path):
    """soundfile hands libsndfile the name as UTF-8: a Latin-1 name was a UnicodeEncodeError traceback
    that stopped the manifest tool; now it is left out by name like any unreadable file."""
    from dyt_wav2vec2.audio import AudioError, inspect_audio

    name = type(tmp_path)(os.fsdecode(bytes(tmp_path / "d") + b"\xe9j\xe0.wav"))
    soundfile.write(str(tmp_path / "ok.wav"), np.zeros(1600, dtype=np.float32), 16000)
    name.write_bytes((tmp_path / "ok.wav").read_bytes())
    with pytest.raises(AudioError, match="a file name that is not UTF-8, which soundfile cannot open: rename the file"):
        inspect_audio(name, decode=True)


def test_a_corpus_folder_is_listed_once_and_its_hidden_folders_not_at_all(tmp_path, monkeypatch):
    """Every rank lists a corpus of perhaps millions of files at start-up: one walk, not one per kind
    of document file (three), and none into a hidden folder, whose files are not read anyway."""
    from dyt_llama.data import DataConfig

    corpus = _corpus(tmp_path / "corpus")
    (corpus / "c").mkdir()
    (corpus / "c" / "rows.jsonl").write_text('{"text": "x"}\n')
    (corpus / ".ipynb_checkpoints").mkdir()
    (corpus / ".ipynb_checkpoints" / "one-checkpoint.txt").write_text("an older copy\n")
    (corpus / "folder.txt").mkdir()  # a folder named like a document is not one
    listed = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listed.append(Path(path)) or scandir(path))
    files = DataConfig(corpus=str(corpus)).source_files()
    assert [p.relative_to(corpus).as_posix() for p in files] == ["a/one.txt", "b/two.txt", "c/rows.jsonl"]
    assert sorted(p.relative_to(corpus).as_posix() for p in listed) == [".", "a", "b", "c", "folder.txt"]


def test_a_resumed_launch_takes_its_data_files_record_once(tmp_path, monkeypatch):
    """The record is checked before a ``--resume`` and written when training starts: one listing of
    the data files for both, on each rank, not one for each."""
    import dyt.train.checkpoint as checkpoint
    import dyt.train.data_files as data_files
    from dyt.train import run_recipe
    from toy_recipe import ToyConfig, ToyTask

    argv = ["--set", f"train.out_dir={tmp_path}", "--set", "train.progress=false", "--set", "train.save_every=1"]
    run_recipe(ToyConfig, ToyTask, [*argv, "--set", "train.steps=1"])
    taken = []
    original = data_files.data_files_of
    counted = lambda config: taken.append(1) or original(config)  # noqa: E731
    monkeypatch.setattr(data_files, "data_files_of", counted)
    assert not hasattr(checkpoint, "data_files_of")  # the resume check takes the launch's record, no copy of its own
    run_recipe(ToyConfig, ToyTask, [*argv, "--set", "train.steps=2", "--resume"])
    assert taken == [1]


def test_pretraining_audio_stats_each_file_twice_at_most(tmp_path, monkeypatch):
    """Reading the manifests (does each file exist?) and then the checks of every file (readable? the
    same recording in training and validation?) stat each file: once for the manifest, once for all
    checks, where each check used to take its own."""
    from dyt_wav2vec2.task import SpeechDataConfig, pretraining_audio

    audio, manifest = _manifest(tmp_path)
    for name in ("x.wav", "y.wav"):  # the manifest's rows are 1600 samples: long enough for min_samples below
        soundfile.write(str(audio / name), np.random.default_rng(len(name)).standard_normal(16000).astype(np.float32) / 4,
                        16000)
    held = tmp_path / "held"
    held.mkdir()
    soundfile.write(str(held / "z.wav"), np.full(16000, 0.1, dtype=np.float32), 16000)
    validation = tmp_path / "validation.tsv"
    validation.write_text(f"{held}\nz.wav\t16000\n")
    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))
    stats = []
    stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: stats.append(self.name) or stat(self, **kw))
    train, held_out = pretraining_audio(SpeechDataConfig(train_manifest=str(manifest), validation_manifest=str(validation)),
                                        min_samples=1000)
    assert [r.path.name for r in train] == ["x.wav", "y.wav"] and [r.path.name for r in held_out] == ["z.wav"]
    assert {name: stats.count(name) for name in ("x.wav", "y.wav", "z.wav")} == {"x.wav": 2, "y.wav": 2, "z.wav": 2}


def test_a_manifest_without_its_root_line_says_so(tmp_path):
    """The first row where the root belongs read every file under a folder named 'x.wav<TAB>1600',
    and the error printed that tab raw."""
    from dyt_wav2vec2.audio import AudioError, read_manifest

    audio, manifest = _manifest(tmp_path)
    manifest.write_text("x.wav\t1600\ny.wav\t1600\n")
    with pytest.raises(AudioError, match=r"train.tsv:1: 'x.wav\\t1600' is a row, not the audio root: a manifest's "
                                         "first line is the folder its rows' paths are relative to"):
        read_manifest(manifest)
    manifest.write_text(f"{audio}\nx.wav\t1600\ny.wav\t1600\n")
    assert [u.path.name for u in read_manifest(manifest)] == ["x.wav", "y.wav"]


def test_a_data_folder_is_listed_through_links_without_hidden_names(tmp_path):
    """``Path.rglob`` did not enter a linked folder (a corpus gathered by links lost those files
    without a word), a link to nothing was a traceback where it was read, and the manifest tool listed
    hidden folders the LLaMA reader skips. A folder reached both ways keeps its spelling without the
    link; a link up to a folder above adds nothing; what is left out is named."""
    from dyt_data import files_by_suffix

    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    for name in ("a.txt", "deep/b.TXT", "notes.md"):
        (outside / name).write_text("x")
    root = tmp_path / "root"
    (root / ".cache").mkdir(parents=True)
    (root / ".cache" / "old.txt").write_text("x")
    (root / ".hidden.txt").write_text("x")
    (root / "data").mkdir()
    (root / "data" / "c.txt").write_text("x")
    (root / "backup").symlink_to(root / "data")  # sorts first, yet the real spelling is kept
    (root / "linked").symlink_to(outside)
    (root / "again").symlink_to(outside)  # the same folder twice: listed once, by the first link found
    (outside / "loop").symlink_to(root)  # a loop back: adds nothing
    (root / "up").symlink_to(tmp_path)  # a folder above: adds nothing, nor what lies beside the root
    (root / "file-link.txt").symlink_to(outside / "a.txt")  # the same file as again/a.txt: listed once, by its name
    (root / "gone").symlink_to(tmp_path / "no-such-folder")
    (tmp_path / "beside.txt").write_text("x")
    listed = files_by_suffix(root, [".txt", ".jsonl"], ValueError)
    assert [p.relative_to(root).as_posix() for p in listed.found[".txt"]] == ["again/a.txt", "data/c.txt"]
    assert listed.found[".jsonl"] == [] and listed.other == {".md": 1, ".TXT": 1} and listed.again == 1
    assert [p.relative_to(root).as_posix() for p in files_by_suffix(root, [".txt"], any_case=True).found[".txt"]] == [
        "again/a.txt", "again/deep/b.TXT", "data/c.txt"]
    assert listed.other_kinds() == (f"2 file(s) of other kinds (.md: 1, .TXT: 1) and 1 folder(s) that cannot be listed or "
                                    f"link(s) to nothing: {root / 'gone'}: "
                                    f"a link to '{tmp_path / 'no-such-folder'}', which does not exist and 1 file(s) "
                                    "reached a second time through a link (read once)")
    (tmp_path / "ext" / "books").mkdir(parents=True)  # up from inside a linked folder: what lies beside stays out
    (tmp_path / "ext" / "books" / "parent").symlink_to(tmp_path / "ext")
    (tmp_path / "ext" / "private").mkdir()
    (tmp_path / "ext" / "private" / "secret.txt").write_text("x")
    (root / "books").symlink_to(tmp_path / "ext" / "books")
    assert files_by_suffix(root, [".txt"]).found == {".txt": listed.found[".txt"]}
    (root / "books").unlink()
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "r").symlink_to(root)  # the root given through a link, holding a link up to its folder
    (root / "to-top").symlink_to(tmp_path / "top")
    (tmp_path / "top" / "other.txt").write_text("x")
    through = files_by_suffix(tmp_path / "top" / "r", [".txt"])
    assert [p.relative_to(tmp_path / "top" / "r").as_posix() for p in through.found[".txt"]] == [
        "again/a.txt", "data/c.txt"]
    (root / "to-top").unlink()
    (root / "a-link.txt").symlink_to(root / "data" / "c.txt")  # found before its target: the target's name is kept
    assert files_by_suffix(root, [".txt"]).found == {".txt": listed.found[".txt"]}
    (root / "a-link.txt").unlink()
    stat, stated = os.stat, []
    with pytest.MonkeyPatch.context() as patch:  # a listing stats folders and links, not each of perhaps millions of files
        patch.setattr(os, "stat", lambda path, *a, **k: stated.append(os.fspath(path)) or stat(path, *a, **k))
        assert files_by_suffix(root, [".txt", ".jsonl"], ValueError).found == listed.found
    assert stated and not [path for path in stated if path.endswith("c.txt")]
    (root / "lost+found").mkdir()  # root-only on a mounted disk: it was passed over, and still is, but said
    scandir = os.scandir

    def refusing(path="."):
        if Path(path).name == "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", refusing)
        locked = files_by_suffix(root, [".txt"], ValueError)
    assert locked.found == {".txt": listed.found[".txt"]}
    assert f"{root / 'lost+found'} (cannot be listed: Permission denied)" in locked.skipped
    (root / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(ValueError, match=r"gone.txt: a link to '.*nowhere.txt', which does not exist: restore its "
                                         "target, or remove the link"):
        files_by_suffix(root, [".txt"], ValueError)


def test_the_corpus_and_the_manifest_tool_read_linked_folders_and_say_what_they_leave_out(tmp_path, capsys):
    from dyt_llama.data import DataConfig, load_documents
    from dyt_wav2vec2.audio import manifest_from_folder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(12):
        (elsewhere / f"doc{i:02d}.txt").write_text(f"document {i} " * 20)
    (elsewhere / "shouting.TXT").write_text("NOT READ: ITS SUFFIX IS NOT .txt " * 20)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "books").symlink_to(elsewhere)
    (corpus / "README.md").write_text("about the corpus\n")
    documents = load_documents(DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "c")))
    assert len(documents["train"]) + len(documents["validation"]) == 12
    assert "books/doc01" in [*documents["train"]["title"], *documents["validation"]["title"]]
    assert (f"corpus {corpus}: reading 12 .txt / .jsonl / .parquet file(s); left out 2 file(s) of other kinds "
            "(.md: 1, .TXT: 1)") in capsys.readouterr().out
    audio = tmp_path / "audio"
    (audio / "speaker").mkdir(parents=True)
    (audio / ".trash").mkdir()
    tone = (np.sin(np.arange(16000) / 7) * 0.3).astype(np.float32)
    soundfile.write(str(audio / "speaker" / "a.mp3"), tone, 16000, format="MP3")
    soundfile.write(str(audio / ".trash" / "b.wav"), tone, 16000)
    (audio / "linked").symlink_to(elsewhere)
    soundfile.write(str(elsewhere / "c.FLAC"), tone, 16000)
    told = []
    rows = manifest_from_folder(audio, tmp_path / "train.tsv", on_other=told.append)
    assert sorted(r.path.relative_to(audio).as_posix() for r in rows) == ["linked/c.FLAC", "speaker/a.mp3"]
    assert told == ["left out 13 file(s) of other kinds (.txt: 13)"]  # audio suffixes in any case, others too


def test_a_saved_audio_datasets_bad_rows_count_against_the_allowance(tmp_path, monkeypatch, capsys):
    """One stereo row among 20 stopped the run whatever ``data.max_bad_fraction`` allowed (a manifest's
    bad file is left out within it): the row is now left out by name, within the allowance."""
    datasets = pytest.importorskip("datasets")
    from dyt_wav2vec2.audio import AudioError
    from dyt_wav2vec2.task import SpeechDataConfig, pretraining_audio

    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        paths.append(str(tmp_path / f"{i}.wav"))
        soundfile.write(paths[-1], (rng.standard_normal(16000) / 4).astype(np.float32), 16000)
    paths.append(str(tmp_path / "stereo.wav"))
    soundfile.write(paths[-1], (rng.standard_normal((16000, 2)) / 4).astype(np.float32), 16000)
    datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio()).save_to_disk(
        str(tmp_path / "saved"))
    held = tmp_path / "held"
    held.mkdir()
    soundfile.write(str(held / "z.wav"), (rng.standard_normal(16000) / 4).astype(np.float32), 16000)
    (tmp_path / "validation.tsv").write_text(f"{held}\nz.wav\t16000\n")

    def config(allowed: float) -> SpeechDataConfig:
        return SpeechDataConfig(train_manifest=str(tmp_path / "saved"), validation_manifest=str(tmp_path / "validation.tsv"),
                                max_bad_fraction=allowed)

    with pytest.raises(AudioError, match=r"training audio: 1 of 21 files are bad \(allowed: 0.0%.*saved\[20\]: 2 channels; "
                                         r"wav2vec 2.0 takes mono audio \(mix it down"):
        pretraining_audio(config(0.0), min_samples=1000)
    train, validation = pretraining_audio(config(0.1), min_samples=1000)
    assert len(train) == 20 and len(validation) == 1
    assert "training audio: left out 1 bad file(s) of 21 (allowed: 10.0%)" in capsys.readouterr().out


def test_a_saved_audio_datasets_failed_rows_are_stored_and_named_with_the_folder_to_delete(tmp_path, monkeypatch):
    """What was wrong with a row is stored with the copies (every rank of a launch must see the same
    rows, so none decodes it again on its own): read back, it names the folder whose deletion decodes
    the rows anew, e.g. after a file server's passing error."""
    datasets = pytest.importorskip("datasets")
    import dyt_wav2vec2.audio as audio_module

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.wav"))
        soundfile.write(paths[-1], np.full(8000 + i, 0.25, dtype=np.float32), 16000)
    datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "saved"))
    load_audio = audio_module.load_audio

    def flaky(data, name=None):
        if name.endswith("[1]"):
            raise audio_module.AudioError(f"{name}: unreadable audio (Input/output error)")
        return load_audio(data, name)

    monkeypatch.setattr(audio_module, "load_audio", flaky)
    rows, problems = audio_module.utterances_from_hf_dataset(tmp_path / "saved", tmp_path / "cache")
    assert [u.num_samples for u in rows] == [8000, 8002]
    assert problems == [f"{tmp_path / 'saved'}[1]: unreadable audio (Input/output error)"]
    monkeypatch.setattr(audio_module, "load_audio", load_audio)  # the file server is back
    again, stored = audio_module.utterances_from_hf_dataset(tmp_path / "saved", tmp_path / "cache")
    assert again == rows and len(stored) == 1
    folder = re.search(r"stored by the conversion in (.*): delete that folder to decode the rows again\)$", stored[0])[1]
    assert stored[0].startswith(problems[0]) and Path(folder) == rows[0].path.parent
    shutil.rmtree(folder)
    rows, problems = audio_module.utterances_from_hf_dataset(tmp_path / "saved", tmp_path / "cache")
    assert [u.num_samples for u in rows] == [8000, 8001, 8002] and problems == []
