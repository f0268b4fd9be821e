"""DNA data: pretraining windows from FASTA files and classification tasks (GenomicBenchmarks
folders, ``sequence,label`` CSVs, and two built-in tasks on real genomes), all held as HF
``datasets`` and cached on disk.

Built-in splits never cut one genome into train and test: the held-out strain of each species
(see :mod:`dyt_dna.genomes`) gives validation (first half) and test (second half) data.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import datasets
import numpy as np
import torch
from filelock import FileLock

from dyt.errors import UserInputError, folder_problem
from dyt.train.config import NON_NEGATIVE, PROBABILITY, ConfigError, Range
from dyt.train.jsonio import write_json
from dyt_data import cache_root, file_key, reported_as

from .fasta import FastaError, iter_fasta, not_a_fasta_file, read_fasta
from .genomes import HELD_OUT, Genome, builtin_genomes, species_names
from .tokenizer import MASK, SPECIALS, encode, reverse_complement


class DnaDataError(UserInputError):
    """Input data that cannot be used; the message names the file or folder."""

    kind = "data error"


@dataclass
class DnaDataConfig:
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset({"cache_dir"})
    """``--resume`` accepts a moved window cache: the windows are rebuilt the same from the FASTA files."""

    fasta: list[str] = field(default_factory=list)
    """Pretraining FASTA files (.fa/.fasta, optionally .gz). Empty: the built-in training strains."""
    validation_fasta: list[str] = field(default_factory=list)
    """Whole held-out FASTA files for validation (needed with ``fasta``). Empty with no ``fasta``:
    the first half of the built-in held-out strains."""
    window: Annotated[int, Range(ge=2)] = 1024
    """Bases per pretraining sequence (at most model.max_len)."""
    stride: Annotated[int, NON_NEGATIVE] = 0
    """Start-to-start distance of windows; 0: ``window`` (no overlap)."""
    max_windows: Annotated[int, NON_NEGATIVE] = 0
    """Evenly spaced subset of this many windows per split (0: all)."""
    max_n_fraction: Annotated[float, PROBABILITY] = 0.5
    """Windows with more N than this are skipped (assembly gaps)."""
    rc_augment: bool = False
    """Reverse-complement each training sequence with probability 1/2."""
    mask_prob: Annotated[float, Range(gt=0, le=1)] = 0.15
    """Masked-LM (Caduceus): fraction of bases predicted; of those 80% [MASK], 10% random, 10% kept."""
    cache_dir: str = ""
    """Where windows are cached (empty: $DYT_CACHE/dna)."""

    def source_files(self) -> list[Path]:
        """The user's FASTA files (``dyt.train.data_files``); none for the built-in strains."""
        return [Path(p) for p in (*self.fasta, *self.validation_fasta)]

    def validate(self) -> None:
        problem = folder_problem(_cache_dir(self.cache_dir))
        if problem is not None:
            raise ConfigError(f"data.cache_dir: {problem}")


def _cache_dir(cfg_dir: str) -> Path:
    return Path(cfg_dir) if cfg_dir else cache_root() / "dna"


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


WINDOWS_VERSION = 2
"""Part of the windows cache's key: raise it when :func:`_windows` changes what it yields, or the
windows cached by the old code are read back (the key is otherwise the files and settings only;
2: IUPAC ambiguity codes count as N, as :func:`~dyt_dna.tokenizer.encode` reads them, and each
window names its region, ``region``)."""


@dataclass(frozen=True)
class Region:
    """A part of one FASTA file: ``fraction`` (lo, hi) of each record."""

    path: Path
    lo: float = 0.0
    hi: float = 1.0


def _windows(regions: list[tuple[int, Region]], window: int, stride: int, max_n: float, key: str = "",
             ) -> Iterator[dict]:
    # ``key`` (the files' sizes and times, dyt_data.file_key) is unused here but part of datasets' own cache key for the
    # generator: without it a FASTA rewritten in place at the same path gave its old windows.
    # (index, region) pairs: datasets hands a list argument to the generator in shards, one sublist
    # per call, so a position in the list it sees is not the region's
    for index, region in regions:
        for record in iter_fasta(region.path):
            seq = record.sequence
            first, last = int(len(seq) * region.lo), int(len(seq) * region.hi)
            for start in range(first, last - window + 1, stride):
                piece = seq[start : start + window]
                unknown = window - sum(piece.count(base) for base in "ACGT")  # N and the ambiguity codes
                if unknown <= max_n * window:
                    yield {"sequence": piece, "source": f"{region.path.name}:{record.name}", "start": start,
                           "region": index}


def window_dataset(regions: list[Region], window: int, stride: int, max_windows: int, cfg: DnaDataConfig,
                   ) -> datasets.Dataset:
    """Windows of ``regions``, cached on disk keyed by the files, window and stride."""
    for region in regions:
        if not region.path.is_file():
            raise DnaDataError(not_a_fasta_file(region.path))
    no_window = DnaDataError(f"no window of {window} bases fits in {', '.join(r.path.name for r in regions)} "
                             f"with at most {cfg.max_n_fraction:.0%} N (data.max_n_fraction): use shorter windows "
                             "or longer records")
    key = _fingerprint([(file_key(r.path), r.lo, r.hi) for r in regions], window, stride, cfg.max_n_fraction,
                       WINDOWS_VERSION)
    target = _cache_dir(cfg.cache_dir) / "windows" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # the ranks of a launch all ask for the windows at once
        if (target / "dataset_info.json").is_file():
            rows = datasets.load_from_disk(str(target))
        else:
            # datasets' own build goes to a folder of this build's, removed once the windows are saved: in a
            # shared <cache>/hf it stayed beside them, every window on disk twice (~3 GB for a human genome)
            building = target.parent / f".{key}.building"
            try:
                rows = datasets.Dataset.from_generator(
                    _windows, gen_kwargs={"regions": list(enumerate(regions)), "window": window, "stride": stride,
                                          "max_n": cfg.max_n_fraction, "key": key},
                    cache_dir=str(building),
                )
                rows.save_to_disk(str(target))
            except datasets.exceptions.DatasetGenerationError as error:
                cause = error.__cause__ or error
                if isinstance(cause, datasets.arrow_writer.SchemaInferenceError):  # no window at all
                    raise no_window from None
                raise (cause if isinstance(cause, (FastaError, ValueError)) else DnaDataError(str(cause))) from None
            finally:
                shutil.rmtree(building, ignore_errors=True)
            rows = datasets.load_from_disk(str(target))  # its own files, not the removed build's
    if len(rows) == 0:
        raise no_window
    given = set(rows.unique("region"))
    if empty := [str(r.path) for i, r in enumerate(regions) if i not in given]:  # the others gave some: say which not
        raise DnaDataError(f"{', '.join(empty)}: no window of {window} bases fits (records too short, or more than "
                           f"{cfg.max_n_fraction:.0%} N, data.max_n_fraction): the file would add nothing; drop it, "
                           "or use shorter windows")
    if max_windows and len(rows) > max_windows:
        rows = rows.select(np.linspace(0, len(rows) - 1, max_windows).round().astype(int).tolist())
    return rows


def _check_distinct_files(train: list[str], validation: list[str]) -> None:
    """One file named twice in a split would count its windows twice; a file in both splits would
    validate on training windows."""
    for key, files in (("data.fasta", train), ("data.validation_fasta", validation)):
        seen: dict[Path, str] = {}
        for name in files:
            path = Path(name).resolve()
            if path in seen:
                raise DnaDataError(f"{key} names {seen[path]} twice (as {seen[path]} and {name}): its windows would count twice")
            seen[path] = name
    both = sorted({Path(n).resolve() for n in train} & {Path(n).resolve() for n in validation})
    if both:
        raise DnaDataError(f"{', '.join(map(str, both))} in both data.fasta and data.validation_fasta: validation would "
                           "score training windows; hold out whole files of their own")


_COMPLEMENT = str.maketrans("ACGTRYKMSWBDHVN", "TGCAYRMKSWVHDBN")
"""Each base's complement, IUPAC ambiguity codes included (R = A/G pairs with Y = C/T, ...)."""


def _reverse_complement_text(sequence: str) -> str:
    """The other strand of an upper-case sequence, read 5' to 3' (``tokenizer.reverse_complement`` does
    this for token ids)."""
    return sequence.translate(_COMPLEMENT)[::-1]

RECORDS_VERSION = 2
"""Part of the record digests' cache key (2: each record's reverse complement and length too)."""


def _record_digests(path: Path, cache: Path) -> list[tuple[str, str, int]]:
    """(SHA-256 of the sequence, of its reverse complement, its length) of each record in ``path``,
    kept in ``cache`` by the file's :func:`dyt_data.file_key` (a genome is read once, not at every launch)."""
    if not path.is_file():
        raise DnaDataError(not_a_fasta_file(path))
    target = cache / "records" / f"{_fingerprint(file_key(path), RECORDS_VERSION)}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # the ranks of a launch all ask at once: one reads the genome
        if target.is_file():
            return [tuple(row) for row in json.loads(target.read_text())]
        digests = [(hashlib.sha256(record.sequence.encode()).hexdigest(),
                    hashlib.sha256(_reverse_complement_text(record.sequence).encode()).hexdigest(),
                    len(record.sequence))
                   for record in iter_fasta(path)]
        write_json(target, digests)
    return digests


def _check_held_out_sequences(train: list[str], validation: list[str], cache: Path) -> None:
    """A validation file whose records hold half its bases or more as training records, on either
    strand (the same genome copied, given once gzipped and once not, reverse-complemented, or with a
    record added), would validate on trained sequence; a small record shared (a plasmid two strains
    carry) is biology, not a copy, and passes."""
    trained = {}
    for name in train:
        for forward, reverse, _ in _record_digests(Path(name), cache):
            trained.setdefault(forward, name)
            trained.setdefault(reverse, name)
    for name in validation:
        records = _record_digests(Path(name), cache)
        shared = [(forward, length) for forward, _, length in records if forward in trained]
        shared_bases, bases = sum(length for _, length in shared), sum(length for _, _, length in records)
        if 2 * shared_bases >= bases:
            copies = ", ".join(dict.fromkeys(trained[digest] for digest, _ in shared))
            raise DnaDataError(
                f"data.validation_fasta {name}: {len(shared)} of its {len(records)} record(s), {shared_bases:,} of "
                f"{bases:,} bases, are sequences of data.fasta ({copies}; either strand): validation would score "
                "trained sequence; hold out a genome training never reads")


def pretraining_regions(cfg: DnaDataConfig) -> tuple[list[Region], list[Region]]:
    """(training, validation) regions: the user's files, or the built-in strains."""
    if cfg.fasta:
        if not cfg.validation_fasta:
            raise DnaDataError(
                "data.validation_fasta is empty: give whole held-out FASTA files (validation is split by "
                "genome, never by window)"
            )
        _check_distinct_files(cfg.fasta, cfg.validation_fasta)
        _check_held_out_sequences(cfg.fasta, cfg.validation_fasta, _cache_dir(cfg.cache_dir))
        return [Region(Path(p)) for p in cfg.fasta], [Region(Path(p)) for p in cfg.validation_fasta]
    if cfg.validation_fasta:
        raise DnaDataError("data.validation_fasta is given without data.fasta: the built-in strains would be used for "
                           "both splits and the file ignored; give the training FASTA files too")
    genomes = builtin_genomes()
    return ([Region(g.path) for g in genomes if not g.held_out],
            [Region(g.path, 0.0, 0.5) for g in genomes if g.held_out])


def pretraining_datasets(cfg: DnaDataConfig, max_len: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if cfg.window > max_len:
        raise DnaDataError(f"data.window ({cfg.window}) is longer than the model's context (model.max_len {max_len})")
    train, validation = pretraining_regions(cfg)
    stride = cfg.stride or cfg.window
    with reported_as(DnaDataError, _cache_dir(cfg.cache_dir)):  # a full disk: one line
        return (window_dataset(train, cfg.window, stride, cfg.max_windows, cfg),
                window_dataset(validation, cfg.window, cfg.window, cfg.max_windows, cfg))


def tokens(sequences: list[str], where: str = "sequence") -> torch.Tensor:
    """(batch, length) token ids; sequences of unequal length are right-padded."""
    ids = [encode(s, where) for s in sequences]
    return torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)


def maybe_reverse_complement(batch: torch.Tensor) -> torch.Tensor:
    flip = (torch.rand(batch.shape[0]) < 0.5).to(batch.device)  # drawn on the CPU, as mask_for_mlm draws
    batch = batch.clone()
    batch[flip] = reverse_complement(batch[flip])
    return batch


def mask_for_mlm(batch: torch.Tensor, prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for masked-LM: targets are -100 except at the chosen positions. The draws
    come from the CPU generator whatever the batch's device (the same masks on a GPU as on a CPU, from
    the RNG state checkpoints keep) and move to the batch's device (the trainer moves batches first)."""
    chosen = torch.rand(batch.shape) < prob
    roll = torch.rand(batch.shape)
    random_base = chosen & (roll >= 0.8) & (roll < 0.9)
    bases = torch.randint(len(SPECIALS), len(SPECIALS) + 4, (int(random_base.sum()),))
    chosen, roll, random_base = (t.to(batch.device) for t in (chosen, roll, random_base))
    targets = torch.where(chosen, batch, torch.full_like(batch, -100))
    inputs = batch.clone()
    inputs[chosen & (roll < 0.8)] = MASK
    inputs[random_base] = bases.to(batch.device, batch.dtype)
    return inputs, targets


# ---------------------------------------------------------------- classification tasks


@dataclass
class ClassificationData:
    name: str
    classes: list[str]
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    note: str = ""

    def check_length(self, max_len: int, truncate: bool | None) -> ClassificationData:
        """Error on sequences longer than the model's context, or cut them when ``truncate`` (and say so in
        ``note``); ``None``: the caller cannot truncate (``dyt-dna-compare``), and the error says where to."""
        longest = max(max(len(s) for s in split["sequence"]) for split in (self.train, self.validation, self.test))
        if longest <= max_len:
            return self
        if not truncate:
            advice = ("pass --truncate to keep the first bases of each" if truncate is not None else
                      "dyt-dna-compare fine-tunes on whole sequences: give a task whose sequences fit, or fine-tune "
                      "each run with python -m dyt_dna.eval --truncate")
            raise DnaDataError(f"task {self.name}: sequences up to {longest} bases, longer than the model's "
                               f"context ({max_len}); {advice}")
        lengths = [len(s) for split in (self.train, self.validation, self.test) for s in split["sequence"]]
        cut_note = (f"--truncate: {sum(n > max_len for n in lengths)} of {len(lengths)} sequences (up to {longest} "
                    f"bases) cut to their first {max_len} bases, the model's context.")
        cut = lambda row: {"sequence": row["sequence"][:max_len]}  # noqa: E731
        return ClassificationData(self.name, self.classes, self.train.map(cut), self.validation.map(cut),
                                  self.test.map(cut), " ".join(filter(None, (self.note, cut_note))))


def _read_sequence_file(path: Path) -> str:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError:
        raise DnaDataError(f"{path}: not an ASCII sequence file") from None
    if sum(line.startswith(">") for line in lines) > 1:  # joined, two sequences would make one
        raise DnaDataError(f"{path}: {sum(line.startswith('>') for line in lines)} FASTA records; a benchmark file "
                           "holds one sequence: split the file, one per record")
    text = "".join(line.strip() for line in lines if not line.startswith(">"))
    if not text:
        raise DnaDataError(f"{path}: empty sequence")
    encode(text.upper(), where=str(path))
    return text.upper()


def genomic_benchmarks(folder: Path, seed: int = 0, validation_fraction: float = 0.1) -> ClassificationData:
    """``<task>/{train,test}/<class>/*.txt``, one sequence per file; validation: a seeded
    ``validation_fraction`` of the training files (the benchmark ships no validation split), at least
    as many as there are classes, drawn by class so that each class keeps its share of training (a
    draw over all files could take a small class's every file out of training)."""
    splits = {}
    for split in ("train", "test"):
        root = folder / split
        if not root.is_dir():
            raise DnaDataError(f"{folder}: no {split}/ folder (a task folder holds <task>/{{train,test}}/<class>/*.txt, "
                               "or train.csv, dev.csv and test.csv: docs/dna.md)")
        # hidden folders (.ipynb_checkpoints, .git) are no class
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DnaDataError(f"{root}: no class folders")
        rows = {"sequence": [], "label": []}
        for label, class_dir in enumerate(class_dirs):
            files = sorted(class_dir.glob("*.txt"))
            if not files:
                raise DnaDataError(f"{class_dir}: label folder with no .txt files")
            if split == "train" and len(files) < 2:
                raise DnaDataError(f"{class_dir}: one training file; validation takes a share of each class's "
                                   "training files, so each class needs at least two")
            rows["sequence"] += [_read_sequence_file(f) for f in files]
            rows["label"] += [label] * len(files)
        splits[split] = (rows, [p.name for p in class_dirs])
    classes = splits["train"][1]
    if splits["test"][1] != classes:
        raise DnaDataError(f"{folder}: train classes {classes} differ from test classes {splits['test'][1]}")
    features = datasets.Features({"sequence": datasets.Value("string"), "label": datasets.ClassLabel(names=classes)})
    train = datasets.Dataset.from_dict(splits["train"][0], features=features)
    held = max(math.ceil(validation_fraction * len(train)), len(classes))
    pieces = train.train_test_split(test_size=held, seed=seed, stratify_by_column="label")
    return checked(ClassificationData(folder.name, classes, pieces["train"], pieces["test"],
                                      datasets.Dataset.from_dict(splits["test"][0], features=features),
                                      f"GenomicBenchmarks layout; validation = {validation_fraction:.0%} of "
                                      "training files, by class."), where=str(folder))


def checked(task: ClassificationData, where: str) -> ClassificationData:
    """``task`` when a classifier can be trained and judged on it: every split has examples, the
    training split at least two classes (a head fitted on one class scores 1.0 on a test set of that
    class and learns nothing) and two examples, and every validation and test label is one training
    has (else accuracy on it is 0 by construction); else a DnaDataError naming ``where``. Said in its
    note, not refused (benchmarks ship both): evaluation sequences that training holds, and one
    sequence under two labels anywhere in the task."""
    for split in ("train", "validation", "test"):
        if len(getattr(task, split)) == 0:
            raise DnaDataError(f"{where}: the {split} split has no examples")
    seen = set(task.train["label"])
    if len(seen) < 2 or len(task.train) < 2:
        raise DnaDataError(f"{where}: training needs at least two classes and two examples; it has "
                           f"{len(task.train)} example(s) of {len(seen)} class(es)")
    for split in ("validation", "test"):
        unseen = sorted(task.classes[i] for i in set(getattr(task, split)["label"]) - seen)
        if unseen:
            raise DnaDataError(f"{where}: {split} labels {unseen} never occur in training")
    trained = set(task.train["sequence"])
    trained |= {_reverse_complement_text(sequence) for sequence in trained}
    copies = {split: sum(s in trained for s in getattr(task, split)["sequence"]) for split in ("validation", "test")}
    if any(copies.values()):  # said, not refused: benchmarks ship such rows
        counted = " and ".join(f"{n} of {len(getattr(task, split))} {split}" for split, n in copies.items())
        note = f"{counted} sequences are training sequences (either strand): their scores measure recall, not generalisation."
        task = dataclasses.replace(task, note=" ".join(filter(None, (task.note, note))))
    labels_of: dict[str, set[int]] = {}
    for split in ("train", "validation", "test"):
        for sequence, label in zip(getattr(task, split)["sequence"], getattr(task, split)["label"]):
            labels_of.setdefault(sequence, set()).add(label)
    if conflicting := {sequence for sequence, labels in labels_of.items() if len(labels) > 1}:
        rows = {split: sum(s in conflicting for s in getattr(task, split)["sequence"])
                for split in ("train", "validation", "test")}
        counted = ", ".join(f"{n} {split}" for split, n in rows.items() if n)
        note = (f"{len(conflicting)} distinct sequence(s) carry two or more labels ({counted} rows): no classifier "
                "scores every one of them right.")
        task = dataclasses.replace(task, note=" ".join(filter(None, (task.note, note))))
    return task


def _read_csv_split(path: Path) -> dict[str, list[str]]:
    """The ``sequence`` and ``label`` columns of one CSV split, every row checked: as many fields as
    the header (an unquoted comma in a label shifts every column), a sequence of DNA letters and a
    label in each."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            csv.field_size_limit(2**31 - 1)  # the default, 131072 characters, refused longer sequences as unreadable
            reader = csv.reader(handle, skipinitialspace=True)
            header = [name.strip() for name in next(reader, [])]
            missing = {"sequence", "label"} - set(header)
            if missing:
                raise DnaDataError(f"{path}: missing column(s) {sorted(missing)}; found {header}")
            if twice := sorted({name for name in ("sequence", "label") if header.count(name) > 1}):
                raise DnaDataError(f"{path}: the header names {', '.join(twice)} twice: which column holds it?")
            columns = {"sequence": [], "label": []}
            at = {name: header.index(name) for name in columns}
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DnaDataError(f"{path} line {line}: {len(row)} fields, the header has {len(header)} "
                                       "(quote a label or sequence that holds a comma)")
                sequence, label = row[at["sequence"]].strip(), row[at["label"]].strip()
                if not sequence or not label:
                    raise DnaDataError(f"{path} line {line}: an empty {'sequence' if not sequence else 'label'}")
                encode(sequence.upper(), where=f"{path} line {line}")
                columns["sequence"].append(sequence.upper())
                columns["label"].append(label)
    except UnicodeDecodeError as error:
        raise DnaDataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except csv.Error as error:
        raise DnaDataError(f"{path}: not a readable CSV file ({error})") from None
    return columns


def csv_task(folder: Path) -> ClassificationData:
    """``train.csv``, ``dev.csv`` (or ``validation.csv``) and ``test.csv`` with ``sequence,label``
    columns (others are ignored); classes are the labels' texts, sorted (as numbers where every
    label is an integer, so 10 comes after 2)."""
    if (folder / "dev.csv").is_file() and (folder / "validation.csv").is_file():
        raise DnaDataError(f"{folder}: both dev.csv and validation.csv: which is the validation split? keep one")
    files = {"train": folder / "train.csv", "validation": next(
        (folder / n for n in ("dev.csv", "validation.csv") if (folder / n).is_file()), folder / "dev.csv"),
        "test": folder / "test.csv"}
    for split, path in files.items():
        if not path.is_file():
            raise DnaDataError(f"{folder}: no {path.name} ({split} split with sequence,label columns)")
    columns = {split: _read_csv_split(path) for split, path in files.items()}
    labels = {label for split in columns.values() for label in split["label"]}
    integers = all(re.fullmatch(r"-?[0-9]+", label) for label in labels)
    names = sorted(labels, key=lambda label: (int(label), label) if integers else (0, label))
    folded: dict[str, list[str]] = {}
    for label in names:
        folded.setdefault(label.casefold(), []).append(label)
    if spelled := [" / ".join(group) for group in folded.values() if len(group) > 1]:
        raise DnaDataError(f"{folder}: labels that differ only in case ({'; '.join(spelled)}) would be classes of "
                           "their own: spell each class one way")
    index = {name: i for i, name in enumerate(names)}
    splits = [datasets.Dataset.from_dict({"sequence": columns[s]["sequence"],
                                          "label": [index[label] for label in columns[s]["label"]]})
              for s in ("train", "validation", "test")]
    return checked(ClassificationData(folder.name, names, *splits, note="CSV layout (train / dev / test)."),
                   where=str(folder))


@functools.lru_cache(maxsize=2)
def _genome_sequence(path: Path) -> str:
    """A built-in genome's chromosome (its first record); cached, as tasks read each genome per split."""
    return read_fasta(path)[0].sequence


def _evenly(items: list, count: int) -> list:
    if len(items) <= count:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def _region_windows(genome: Genome, lo: float, hi: float, window: int, count: int) -> list[str]:
    seq = _genome_sequence(genome.path)
    first, last = int(len(seq) * lo), int(len(seq) * hi) - window
    starts = np.linspace(first, last, count).round().astype(int)
    return [seq[s : s + window] for s in starts]


def species_task(window: int, per_species: int) -> ClassificationData:
    """Which of the 4 species a window comes from. Train: the training strains (``per_species``
    windows per species, spread over its strains); validation / test: the held-out strain's halves."""
    classes = species_names()
    genomes = builtin_genomes()
    splits = {s: {"sequence": [], "label": []} for s in ("train", "validation", "test")}
    for label, species in enumerate(classes):
        strains = [g for g in genomes if g.species == species and not g.held_out]
        for i, genome in enumerate(strains):
            share = per_species // len(strains) + (i < per_species % len(strains))
            splits["train"]["sequence"] += _region_windows(genome, 0, 1, window, share)
        held = next(g for g in genomes if g.species == species and g.held_out)
        for split, (lo, hi) in (("validation", (0, 0.5)), ("test", (0.5, 1))):
            splits[split]["sequence"] += _region_windows(held, lo, hi, window, max(1, per_species // 4))
        for split in splits:
            splits[split]["label"] += [label] * (len(splits[split]["sequence"]) - len(splits[split]["label"]))
    held = ", ".join(f"{s} {g}" for s, g in sorted(HELD_OUT.items()))
    return ClassificationData("species", classes, *(datasets.Dataset.from_dict(splits[s]) for s in splits),
                              note=f"Train on training strains; validation/test = first/second half of {held}.")


GENES_VERSION = 1
"""Part of the gene calls' cache key, with pyrodigal's version: raise it when :func:`_genes` changes
how it calls or records them (the ``coding`` and ``start`` tasks' labels come from these calls)."""


def _genes(genome: Genome) -> list[tuple[int, int, int]]:
    """Genes called by pyrodigal as (begin, end, strand): 0-based, end exclusive, strand +1 or -1;
    cached per genome, pyrodigal version and :data:`GENES_VERSION`."""
    import pyrodigal

    key = _fingerprint(file_key(genome.path), pyrodigal.__version__, GENES_VERSION)
    cache = _cache_dir("") / "genes-stranded" / f"{key}.json"
    if cache.is_file():
        return [tuple(g) for g in json.loads(cache.read_text())]

    sequence = _genome_sequence(genome.path).encode()
    finder = pyrodigal.GeneFinder()
    finder.train(sequence)
    genes = [(gene.begin - 1, gene.end, gene.strand) for gene in finder.find_genes(sequence)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, genes)  # renamed into place: a reader never sees half a file
    return genes


def _gene_spans(genome: Genome) -> list[tuple[int, int]]:
    """Coding spans (0-based, end exclusive) from pyrodigal."""
    return [(begin, end) for begin, end, _ in _genes(genome)]


def _coding_windows(genome: Genome, lo: float, hi: float, window: int, per_class: int) -> tuple[list[str], list[str]]:
    """(coding, non-coding) windows: wholly inside one called gene, or touching none."""
    seq = _genome_sequence(genome.path)
    covered = np.zeros(len(seq) + 1, dtype=np.int32)
    inside = np.zeros(len(seq), dtype=bool)
    for begin, end in _gene_spans(genome):
        covered[begin] += 1
        covered[end] -= 1
        if end - begin >= window:
            inside[begin : end - window + 1] = True  # windows starting here stay in this gene
    depth = np.cumsum(covered)[:-1] > 0
    touched = np.concatenate([[0], np.cumsum(depth)])  # coding bases before each position
    first, last = int(len(seq) * lo), int(len(seq) * hi) - window
    starts = np.arange(first, last + 1, max(1, window // 4))
    coding = [s for s in starts if inside[s]]
    noncoding = [s for s in starts if touched[s + window] - touched[s] == 0]
    pick = lambda ss: [seq[s : s + window] for s in _evenly(ss, per_class)]  # noqa: E731
    return pick(coding), pick(noncoding)


def _by_genome(name: str, classes: list[str], windows, window: int, per_class: int, note: str) -> ClassificationData:
    """A two-class task split by genome: train on the training strains, validation / test on the
    first / second halves of the held-out strains; ``windows(genome, lo, hi, window, count)`` gives
    (class 0, class 1) windows, balanced per genome."""
    genomes = builtin_genomes()
    train = [g for g in genomes if not g.held_out]
    held = [g for g in genomes if g.held_out]
    parts = {"train": [(g, 0, 1, per_class // len(train)) for g in train],
             "validation": [(g, 0, 0.5, per_class // 4 // len(held)) for g in held],
             "test": [(g, 0.5, 1, per_class // 4 // len(held)) for g in held]}
    splits = {}
    for split, jobs in parts.items():
        rows = {"sequence": [], "label": []}
        for genome, lo, hi, count in jobs:
            first, second = windows(genome, lo, hi, window, max(1, count))
            count = min(len(first), len(second))  # balanced per genome
            rows["sequence"] += first[:count] + second[:count]
            rows["label"] += [0] * count + [1] * count
        splits[split] = datasets.Dataset.from_dict(rows)
    return ClassificationData(name, classes, splits["train"], splits["validation"], splits["test"], note=note)


def coding_task(window: int, per_class: int) -> ClassificationData:
    """Coding vs non-coding windows (pyrodigal gene calls), classes balanced, split by genome:
    train on the training strains, validation / test on the halves of the held-out strains."""
    def noncoding_then_coding(*args):
        coding, noncoding = _coding_windows(*args)
        return noncoding, coding

    return _by_genome("coding", ["non-coding", "coding"], noncoding_then_coding, window, per_class,
                      "Labels from pyrodigal gene calls; split by genome (held-out strains for validation/test).")


START_CODONS = {1: ("ATG", "GTG", "TTG"), -1: ("CAT", "CAC", "CAA")}
"""Start codons as read on the forward strand, by the gene's strand (reverse complements for -1)."""
MIN_INTERNAL_OFFSET = 60
"""Internal codons lie at least this many bases (20 codons) into the gene, away from its start."""


def _start_windows(genome: Genome, lo: float, hi: float, window: int, per_class: int) -> tuple[list[str], list[str]]:
    """(gene start, internal codon) windows centred on a start-like codon: a called gene's start
    codon, or one in frame inside a called gene. On the forward strand a window centres on the
    codon's first base; on the reverse strand on the base after it (the codon's 5' end there).
    Internal codons are drawn codon by codon as many as the starts use (most starts are ATG), so
    the centre codon alone says nothing of the class."""
    seq = _genome_sequence(genome.path)
    half = window // 2
    first, last = int(len(seq) * lo) + half, int(len(seq) * hi) - (window - half)
    starts: list[tuple[int, int]] = []  # (centre, codon index in START_CODONS)
    internal: dict[int, list[int]] = {i: [] for i in range(3)}
    for begin, end, strand in _genes(genome):
        codons = START_CODONS[strand]
        start_at, centre = (begin, begin) if strand == 1 else (end - 3, end)
        if first <= centre <= last and seq[start_at : start_at + 3] in codons:
            starts.append((centre, codons.index(seq[start_at : start_at + 3])))
        for offset in range(MIN_INTERNAL_OFFSET, end - begin - MIN_INTERNAL_OFFSET, 3):  # in frame, 5' to 3'
            codon_at = begin + offset if strand == 1 else end - offset - 3
            centre = codon_at if strand == 1 else codon_at + 3
            if first <= centre <= last and seq[codon_at : codon_at + 3] in codons:
                internal[codons.index(seq[codon_at : codon_at + 3])].append(centre)
    starts = _evenly(sorted(starts), per_class)
    positive, negative = [], []
    for k in range(3):
        of_codon = [centre for centre, j in starts if j == k]
        count = min(len(of_codon), len(internal[k]))
        positive += _evenly(of_codon, count)
        negative += _evenly(sorted(internal[k]), count)
    window_at = lambda centre: seq[centre - half : centre - half + window]  # noqa: E731
    return [window_at(c) for c in positive], [window_at(c) for c in negative]


def start_task(window: int, per_class: int) -> ClassificationData:
    """Translation start or not: windows centred on a start-like codon (ATG, GTG, TTG), labelled by
    whether pyrodigal calls a gene starting there or the codon sits in frame inside a called gene.
    Classes balanced, split by genome like ``coding``."""
    def internal_then_starts(*args):
        starts, internal = _start_windows(*args)
        return internal, starts

    return _by_genome("start", ["internal codon", "gene start"], internal_then_starts, window, per_class,
                      "Labels from pyrodigal gene calls; every window centres on a start-like codon; split by "
                      "genome (held-out strains for validation/test).")


BUILTIN_TASKS = ("species", "coding", "start")


def check_task(spec: str) -> None:
    """A DnaDataError unless ``spec`` names a built-in task or an existing folder (a cheap check)."""
    if spec not in BUILTIN_TASKS and not Path(spec).expanduser().is_dir():
        raise DnaDataError(f"task {spec!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) nor a folder")


def load_task(spec: str, window: int, per_class: int) -> ClassificationData:
    """A built-in task name, a GenomicBenchmarks task folder, or a folder of CSVs."""
    if spec == "species":
        return species_task(window, per_class)
    if spec == "coding":
        return coding_task(window, per_class)
    if spec == "start":
        return start_task(window, per_class)
    check_task(spec)
    folder = Path(spec).expanduser()
    if (folder / "train.csv").is_file():
        return csv_task(folder)
    return genomic_benchmarks(folder)

