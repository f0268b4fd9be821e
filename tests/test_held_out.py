"""Held-out data never reaches training: whole documents (LLaMA), voices and prompt texts
(wav2vec 2.0), strains (DNA). Each check builds the splits as training builds them, on small data
made here (a tiny corpus, fake 0.1 s utterances in place of the speech synthesiser, synthetic
genomes), and looks for the held-out content by name and by content in everything training sees."""

from __future__ import annotations

import functools
import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile

from dyt.train import load_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- LLaMA: whole documents

FILLER = ("the of and to a in that is was he for it with as his on be at by had not are but from or have an they "
          "which one you were her all she there would their we him been has when who will more no if out so said "
          "what up its about into than them can only other new some could time these two may then do first any my "
          "now such like our over man me even most made after also did many before must through back years where "
          "much your way well down should because each just those people how too little state good very make world").split()


def _document(index: int) -> str:
    """A document with text of its own: a marker sentence at its start and middle, filler in an
    order drawn for this document, and a made-up word repeated (``jvk..`` in training documents,
    ``qxz..`` in validation ones) that a tokenizer trained on the document would learn."""
    rng = random.Random(index)
    marker = f"Marker sentence of document {index:02d}: {rng.choice(FILLER)} heron{index:02d}."
    words = [rng.choice(FILLER) for _ in range(600)]
    return f"{marker} {' '.join(words[:300])} {marker} {' '.join(words[300:])} " + " ".join([f"WORD{index:02d}"] * 50)


def _marker(index: int) -> str:
    return _document(index).split(":")[0] + ":"


def _decoded(rows, tokenizer) -> str:
    """The token stream that packed ``rows`` (each row repeats the previous row's last token), decoded."""
    stream = list(rows[0].tolist())
    for i in range(1, len(rows)):
        row = rows[i].tolist()
        assert row[0] == stream[-1]
        stream += row[1:]
    return tokenizer.decode(stream)


@pytest.mark.parametrize("named", [True, False], ids=["validation_works", "every-tenth-document"])
def test_llama_validation_documents_never_reach_training_rows_or_the_tokenizer(tmp_path, named):
    from dyt_llama.data import load_documents
    from dyt_llama.task import LlamaConfig, LlamaTask

    corpus = tmp_path / "corpus"
    count = 20
    titles = [f"{'ab'[i % 2]}/doc{i:02d}" for i in range(count)]
    order = sorted(titles)  # the corpus is read in path order; by default every 10th document is held out
    held = {3, 14} if named else {int(order[9][-2:]), int(order[19][-2:])}
    for i, title in enumerate(titles):
        path = corpus / f"{title}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_document(i).replace(f"WORD{i:02d}", "qxzqxzq" if i in held else "jvkjvkj"))
    overrides = [f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
                 "model.vocab_size=400", "model.max_seq_len=64"]
    if named:
        overrides.append(f"data.validation_works=[{','.join(t for t in titles if int(t[-2:]) in held)}]")
    config = load_config(LlamaConfig, ROOT / "recipes" / "llama" / "tiny.yaml", overrides)
    task = LlamaTask(config)  # builds the splits, the tokenizer and the packed rows as training does

    docs = load_documents(config.data)
    assert {int(t[-2:]) for t in docs["validation"]["title"]} == held
    assert {int(t[-2:]) for t in docs["train"]["title"]} == set(range(count)) - held
    assert not set(docs["train"]["text"]) & set(docs["validation"]["text"])

    train_text = _decoded(task.train_dataset(), task.tokenizer)
    validation_text = _decoded(task.eval_dataset(), task.tokenizer)
    for i in range(count):
        if i in held:
            assert _marker(i) not in train_text, f"validation document {i} is in the training rows"
            assert f"heron{i:02d}" not in train_text
            assert _marker(i) in validation_text
        else:
            assert _marker(i) in train_text  # the search finds what is there
            assert _marker(i) not in validation_text

    vocab = task.tokenizer.get_vocab()
    assert any("jvk" in token for token in vocab)  # a word of the training documents was learnt
    assert not [token for token in vocab if "qxz" in token or "qx" in token or "xz" in token], \
        "the tokenizer learnt merges from the validation documents"
    if named:  # what a --resume checks: a BPE trained again in a moved cache is the same one; another is not
        moved = load_config(LlamaConfig, ROOT / "recipes" / "llama" / "tiny.yaml", [*overrides, f"data.cache_dir={tmp_path / 'moved'}"])
        assert LlamaTask(moved).data_identity() == task.data_identity()
        smaller = load_config(LlamaConfig, ROOT / "recipes" / "llama" / "tiny.yaml", [*overrides, "model.vocab_size=380"])
        assert LlamaTask(smaller).data_identity() != task.data_identity()
    assert len(task.tokenizer.encode(" qxzqxzq").ids) > len(task.tokenizer.encode(" jvkjvkj").ids)


# ---------------------------------------------------------------- wav2vec 2.0: voices and prompt texts


@pytest.fixture(scope="module")
def speech_root():
    from dyt_wav2vec2.speech import package_root

    return package_root()  # the espeak-ng / flite / Asterisk Debian packages, unpacked once into the cache


def test_wav2vec2_voice_splits_share_no_voice_and_no_variant(speech_root):
    from dyt_wav2vec2.speech import SPLITS, voice_splits

    voices = voice_splits(speech_root)
    assert set(voices) == set(SPLITS) and all(voices[s] for s in SPLITS)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(voices[a]) & set(voices[b]), (a, b)
    # a voice variant (with any accent) or a flite voice belongs to exactly one split
    owner: dict[str, set[str]] = {}
    for split in SPLITS:
        for voice in voices[split]:
            speaker = voice if voice.startswith("flite:") else voice.split("+", 1)[1]
            owner.setdefault(speaker, set()).add(split)
    assert all(len(splits) == 1 for splits in owner.values()), {k: v for k, v in owner.items() if len(v) > 1}
    assert sum(1 for s in owner.values() if s == {"validation"}) >= 10 and sum(1 for s in owner.values() if s == {"test"}) >= 10


def test_wav2vec2_held_out_voices_are_not_near_copies_of_training_ones(speech_root):
    """espeak-ng ships variants that are copies of others at another pitch, echo or Klatt version: a
    held-out voice must not be one of them (v3 of the data held out Gene2, max, edward2, klatt3 ...)."""
    import re

    from dyt_wav2vec2.speech import SAME_VOICE, variant_settings, voice_splits

    variants = {split: {v.split("+", 1)[1] for v in voices if not v.startswith("flite:")}
                for split, voices in voice_splits(speech_root).items()}
    split_of = {v: split for split, names in variants.items() for v in names}
    for a, b in [("Gene", "Gene2"), ("RicishayMax", "max"), ("edward", "edward2"), ("klatt", "klatt3"),
                 ("klatt", "klatt6"), ("iven", "iven2"), ("robosoft4", "robosoft5"), ("Mr serious", "john"),
                 ("Mr serious", "norbert"), ("Michael", "Mario")]:
        assert split_of[a] == split_of[b], (a, b, split_of[a], split_of[b])
    folder = speech_root / "usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v"
    settings = {v: variant_settings(folder / v) for v in split_of}
    for held in variants["validation"] | variants["test"]:
        for trained in variants["train"]:
            assert re.sub(r"\d+$", "", held.lower()) != re.sub(r"\d+$", "", trained.lower()), (held, trained)
            keys = settings[held].keys() | settings[trained].keys()
            equal = sum(settings[held].get(k) == settings[trained].get(k) for k in keys)
            assert keys and equal < SAME_VOICE * len(keys), (held, trained, equal, len(keys))


def test_wav2vec2_prompt_sentences_are_split_by_text(speech_root):
    from dyt_wav2vec2.speech import SPLITS, _split_prompts, prompts, sentence_similarity

    texts = prompts(speech_root)
    assert texts["vm-review"] == "press one to accept this recording press two to listen to it press three to rerecord your message"
    assert "silence/1" not in texts and texts["spy-iax2"] == "iax"  # a silent prompt; a note the recording does not say
    split = _split_prompts(texts)
    assert sorted(n for s in SPLITS for n in split[s]) == sorted(texts)  # every prompt, once
    said = {s: {texts[n] for n in split[s]} for s in SPLITS}
    assert all(said[s] for s in SPLITS)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = said[a] & said[b]
            assert not shared, f"{len(shared)} transcripts in both {a} and {b}: {sorted(shared)[:5]}"
    # nor one word from a training sentence (v3 held out "users will join the conference" beside the
    # trained "user will join ...", "the conference is now muted" beside "... unmuted")
    for held in said["validation"] | said["test"]:
        for trained in said["train"]:
            assert sentence_similarity(held, trained) < 0.8, (held, trained)
    split_of = {text: s for s in SPLITS for text in said[s]}
    assert split_of["user will join the conference"] == split_of["users will join the conference"]
    assert split_of["the conference is now muted"] == split_of["the conference is now unmuted"]
    # difflib's ratio depends on its arguments' order (0.811 one way, 0.774 the other here): both are read
    a, b = "to decrease the audio volume from other participants", "to decrease your speaking volume to other participants"
    assert sentence_similarity(a, b) == sentence_similarity(b, a) >= 0.8 and split_of[a] == split_of[b]


def test_wav2vec2_test_split_holds_nothing_a_setting_was_chosen_on(speech_root):
    """The recipes' settings were chosen on builds v2-v3's validation voices and prompts; v4-v5 put
    two of those variants (antonio, quincy) and six of those prompts into test."""
    from dyt_wav2vec2.speech import (
        CHOSEN_ON_PROMPTS,
        CHOSEN_ON_VARIANTS,
        _asterisk_dir,
        _split_prompts,
        prompts,
        voice_splits,
    )

    folder = speech_root / "usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v"
    assert all((folder / v).is_file() for v in CHOSEN_ON_VARIANTS)  # names of real variants and recordings
    assert all((_asterisk_dir(speech_root) / f"{n}.wav").is_file() for n in CHOSEN_ON_PROMPTS)
    test_voices = {v.split("+", 1)[1] for v in voice_splits(speech_root)["test"] if not v.startswith("flite:")}
    assert not test_voices & CHOSEN_ON_VARIANTS, sorted(test_voices & CHOSEN_ON_VARIANTS)
    texts = prompts(speech_root)
    chosen_texts = {texts[n] for n in CHOSEN_ON_PROMPTS if n in texts}
    assert len(chosen_texts) > 20
    test_texts = {texts[n] for n in _split_prompts(texts)["test"]}
    assert not test_texts & chosen_texts, sorted(test_texts & chosen_texts)


def test_wav2vec2_pretraining_hears_only_training_voices_and_sentences(speech_root, tmp_path, monkeypatch):
    """Build the built-in data as pretraining does (task.pretraining_audio), with a fake synthesiser
    that writes 0.1 s of noise and notes which voice spoke each file."""
    from dyt_wav2vec2 import speech, task
    from dyt_wav2vec2.audio import SAMPLE_RATE, Utterance
    from dyt_wav2vec2.speech import SPLITS, load_split, voice_splits

    spoken_by: dict[str, str] = {}

    def fake_synthesize(root, voice, text, out, rng):
        out.parent.mkdir(parents=True, exist_ok=True)
        wave = np.random.default_rng(len(spoken_by)).standard_normal(SAMPLE_RATE // 10).astype("float32") * 0.1
        soundfile.write(str(out), wave, SAMPLE_RATE, subtype="PCM_16")
        spoken_by[str(out.resolve())] = voice
        return Utterance(out, len(wave), text)

    data = tmp_path / "speech"
    monkeypatch.setattr(speech, "synthesize", fake_synthesize)
    monkeypatch.setattr(task, "build", functools.partial(speech.build, data))
    cfg = task.SpeechDataConfig(builtin_sentences=60)
    train, validation = task.pretraining_audio(cfg, min_samples=1)

    voices = {s: set(v) for s, v in voice_splits(speech_root).items()}
    heard = {name: {spoken_by[str(Path(r.path).resolve())] for r in rows}
             for name, rows in (("train", train), ("validation", validation))}
    assert len(train) == 60 + 36 * 40 and len(validation) == 200
    assert heard["train"] <= voices["train"], heard["train"] - voices["train"]
    assert heard["validation"] <= voices["validation"], heard["validation"] - voices["validation"]
    assert not (heard["train"] | heard["validation"]) & voices["test"]

    def speakers(names):  # an espeak variant is one speaker whatever the accent; a flite voice is one
        return {v if v.startswith("flite:") else v.split("+", 1)[1] for v in names}

    assert not speakers(heard["train"]) & speakers(voices["validation"] | voices["test"])
    for split in SPLITS:  # every synthetic manifest speaks with its own split's voices
        for kind in ("sentences", "keywords"):
            rows = load_split(data, f"{kind}-{split}")
            assert {spoken_by[str(Path(r.path).resolve())] for r in rows} <= voices[split], (kind, split)
    # the real recordings are never pretrained on, and no held-out sentence is said in training
    real = {str(Path(r.path).resolve()) for m in ("real-keywords", "real-sentences-test") for r in load_split(data, m)}
    assert real and not real & {str(Path(r.path).resolve()) for r in train + validation}
    trained_sentences = {r.text for r in load_split(data, "sentences-train")}
    for manifest in ("sentences-validation", "sentences-test", "real-sentences-test"):
        shared = trained_sentences & {r.text for r in load_split(data, manifest)}
        assert not shared, f"{manifest} says training sentences: {sorted(shared)[:5]}"


def test_wav2vec2_speech_is_the_same_in_any_cache_dir_and_grows_by_appending(speech_root, tmp_path, monkeypatch):
    """The built-in speech depends on nothing but the build's arguments: two cache dirs hear the same
    voices say the same texts at the same pitch and speed, and a larger training set only appends."""
    from dyt_wav2vec2 import speech
    from dyt_wav2vec2.audio import SAMPLE_RATE, Utterance

    def fake_synthesize(root, voice, text, out, rng):  # 0.1 s of silence; the drawn prosody in its length
        out.parent.mkdir(parents=True, exist_ok=True)
        samples = SAMPLE_RATE // 10 + rng.randint(0, 10_000)
        soundfile.write(str(out), np.zeros(samples, dtype="float32"), SAMPLE_RATE, subtype="PCM_16")
        return Utterance(out, samples, f"{voice}|{text}")

    monkeypatch.setattr(speech, "synthesize", fake_synthesize)

    def heard(out, train):
        data = speech.build(out, {"train": train, "validation": 5, "test": 5}, keyword_voices=4)
        return {name: [(Path(r.path).relative_to(data).as_posix(), r.num_samples, r.text)
                       for r in speech.load_split(data, name)]
                for name in ("sentences-train", "sentences-validation", "sentences-test", "keywords-train")}

    first, second = heard(tmp_path / "a", 8), heard(tmp_path / "elsewhere" / "b", 8)
    assert first == second
    assert len({n for _, n, _ in first["sentences-train"]}) > 1  # the prosody is drawn, not constant
    larger = heard(tmp_path / "a", 12)  # the same dir, rebuilt at another size
    assert larger["sentences-train"][:8] == first["sentences-train"] and len(larger["sentences-train"]) == 12
    assert {k: v for k, v in larger.items() if k != "sentences-train"} == {
        k: v for k, v in first.items() if k != "sentences-train"}
    assert heard(tmp_path / "a", 8) == first  # and back: not the larger build's manifests


# ---------------------------------------------------------------- DNA: strains


def _genome_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("ACGT") for _ in range(length))


@pytest.fixture
def genomes(tmp_path, monkeypatch):
    """A ragout-examples tree of synthetic genomes: 4 species x 3 strains (the held-out one among
    them), each a chromosome of random sequence (and, for some, a plasmid); returns
    {(species, strain): {record name: sequence}}."""
    from dyt_dna import genomes as genomes_module
    from dyt_dna.genomes import HELD_OUT

    root = tmp_path / "ragout" / "examples"
    made = {}
    for s, (species, held) in enumerate(sorted(HELD_OUT.items())):
        for k, strain in enumerate([f"train{s}a", held, f"train{s}b"]):
            rng = random.Random(f"{species}/{strain}")
            records = {f"{species}_{strain}_chromosome": _genome_text(rng, 3000 + 200 * k)}
            if k != 2:
                records[f"{species}_{strain}_plasmid"] = _genome_text(rng, 700)
            path = root / species / "references" / f"{strain}.fasta.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt") as handle:
                for name, seq in records.items():
                    handle.write(f">{name} synthetic\n" + "".join(seq[i:i + 70] + "\n" for i in range(0, len(seq), 70)))
            made[species, strain] = records
    monkeypatch.setattr(genomes_module, "SYSTEM_DIR", root)
    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))
    return made


def _held_out_and_training(made):
    from dyt_dna.genomes import HELD_OUT

    held = {key: records for key, records in made.items() if HELD_OUT[key[0]] == key[1]}
    training = {key: records for key, records in made.items() if key not in held}
    assert len(held) == 4 and len(training) == 8
    return held, training


def _inside(window: str, genomes: dict) -> bool:
    return any(window in seq for records in genomes.values() for seq in records.values())


def test_dna_pretraining_windows_never_come_from_held_out_strains(genomes, tmp_path):
    from dyt_dna.data import DnaDataConfig, pretraining_datasets, pretraining_regions
    from dyt_dna.genomes import builtin_genomes

    held, training = _held_out_and_training(genomes)
    assert sorted((g.species, g.strain) for g in builtin_genomes() if g.held_out) == sorted(held)
    cfg = DnaDataConfig(window=64, stride=32, cache_dir=str(tmp_path / "windows"))
    train_regions, validation_regions = pretraining_regions(cfg)
    held_files = {f"{strain}.fasta.gz" for _, strain in held}
    assert not {r.path.name for r in train_regions} & held_files
    assert {r.path.name for r in validation_regions} == held_files and all(r.hi <= 0.5 for r in validation_regions)

    train, validation = pretraining_datasets(cfg, max_len=64)
    held_records = {name for records in held.values() for name in records}
    train_sources = set(train["source"])
    assert not {s.split(":")[0] for s in train_sources} & held_files  # by genome file
    assert not {s.split(":")[1] for s in train_sources} & held_records  # by record name
    assert {s.split(":")[1] for s in train_sources} == {n for records in training.values() for n in records}
    for window in train["sequence"]:  # by content
        assert not _inside(window, held), "a held-out strain's sequence is in the pretraining windows"
        assert _inside(window, training)
    assert {s.split(":")[1] for s in validation["source"]} == held_records
    first_halves = {k: {n: seq[: len(seq) // 2] for n, seq in records.items()} for k, records in held.items()}
    for window in validation["sequence"]:  # validation: the first halves only; the second halves stay for testing
        assert _inside(window, first_halves) and not _inside(window, training)


@pytest.mark.parametrize("task_name", ["species", "coding", "start"])
def test_dna_fine_tuning_train_split_never_holds_a_held_out_strain(genomes, monkeypatch, task_name):
    from dyt_dna import data
    from dyt_dna.genomes import species_names

    held, training = _held_out_and_training(genomes)

    def fake_genes(genome):  # pyrodigal calls no genes in random sequence: genes every 150 bases instead
        length = len(genomes[genome.species, genome.strain][f"{genome.species}_{genome.strain}_chromosome"])
        return [(start, start + 300, 1 - 2 * (i % 2)) for i, start in enumerate(range(100, length - 300, 150))]

    monkeypatch.setattr(data, "_genes", fake_genes)
    task = data.load_task(task_name, 64, 48)
    chromosomes = {k: {n: seq for n, seq in records.items() if n.endswith("_chromosome")} for k, records in held.items()}
    halves = {
        "validation": {k: {n: seq[: int(len(seq) * 0.5)] for n, seq in r.items()} for k, r in chromosomes.items()},
        "test": {k: {n: seq[int(len(seq) * 0.5):] for n, seq in r.items()} for k, r in chromosomes.items()},
    }
    assert len(task.train) and len(task.validation) and len(task.test)
    for window in task.train["sequence"]:
        assert not _inside(window, held), f"{task_name}: a held-out strain's window is in the training split"
        assert _inside(window, training)
    for split in ("validation", "test"):
        for window in getattr(task, split)["sequence"]:
            assert _inside(window, halves[split]), f"{task_name}: a {split} window outside its half of a held-out strain"
            assert not _inside(window, training)
    assert not set(task.validation["sequence"]) & set(task.test["sequence"])
    if task_name == "species":  # labels: the species whose strains the windows come from
        for window, label in zip(task.train["sequence"], task.train["label"]):
            species = species_names()[label]
            assert any(window in seq for (sp, _), records in training.items() if sp == species for seq in records.values())
