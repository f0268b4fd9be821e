"""Text data: local files (txt / jsonl / parquet) or a saved ``datasets`` dir, split by document,
a BPE tokenizer trained on the training documents (or loaded), and each split's token stream
(every document followed by <eos>, in order) on disk as memory-mapped token shards
(:mod:`dyt_llama.prepare`, :mod:`dyt_data.shards`). Training reads fixed-length windows out of the
memory map. Everything is cached, so a second run starts at once; a file lock keeps concurrent
ranks from building the same cache twice, and the ranks that wait read what the first one wrote."""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
from filelock import FileLock

from dyt.train.config import Range
from dyt.train.data_files import saved_dataset_files
from dyt.train.jsonio import partial_path
from dyt_data import FolderFiles, cache_folder, cache_root, file_key, files_by_suffix, reported_as
from dyt_data.shards import TokenShards

from .corpus import DataError, prepare_corpus

EOS = "<eos>"
"""The end-of-text token of the byte-level BPE the recipe trains (``data.eos_token``'s default)."""
TOKENIZER_VERSION = 1
"""Part of the trained BPE's cache key: raise it when :func:`load_tokenizer`'s training changes (its
pre-tokenizer, trainer settings), or tokenizers trained by the old code are read back."""
BUILTIN_VALIDATION = ["shakespeare/hamlet", "shakespeare/tempest", "austen/persuasion"]


BYTE_BPE_MIN_VOCAB = 257
"""The byte-level BPE the recipe trains starts from 256 byte tokens and the end-of-text token."""


@dataclass
class DataConfig:
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset({"num_proc", "shard_chars", "cache_dir"})
    """``--resume`` accepts these changed: the token stream is the same for any value (tests/test_token_shards.py);
    a cache elsewhere trains the BPE again, and the run's recorded tokenizer digest stops the resume
    if that came out different (``LlamaTask.data_identity``)."""
    RESUME_CHANGES_RESULTS: ClassVar[frozenset[str]] = frozenset({"cache_dir"})
    """A comparison does not reuse a finished run whose cache moved: its tokenizer, trained again
    there, is checked only when a run is launched."""

    corpus: str = ""
    """A folder of .txt files (one document each, at any depth), .jsonl / .parquet files with a
    ``text`` column (one document per row), or a ``datasets.save_to_disk`` folder.
    Empty: the built-in Shakespeare + Austen corpus (built on first use)."""
    validation_works: list[str] = field(default_factory=list)
    """Documents held out whole for validation: .txt paths relative to ``corpus`` without the suffix,
    or values of a ``title`` column. Empty: Hamlet, The Tempest and Persuasion for the built-in
    corpus, every 10th document otherwise."""
    tokenizer_file: str = ""
    """A ``tokenizers`` JSON file; empty: train a byte-level BPE of ``model.vocab_size`` on the
    training documents."""
    eos_token: str = EOS
    """The token that ends each document in the token stream: one of the tokenizer's (LLaMA 1/2's
    tokenizer: ``</s>``, Llama 3's: ``<|end_of_text|>``); the trained BPE is given it."""
    seq_len: Annotated[int, Range(ge=2)] = 128
    """Tokens per training sequence (at most model.max_seq_len)."""
    cache_dir: str = ""
    """Default: $DYT_CACHE (~/.cache/dyt)."""
    num_proc: Annotated[int, Range(ge=1)] = 1
    """Processes that filter, survey and tokenise the corpus's documents when its token shards are
    built (datasets' ``filter`` / ``map`` num_proc, at most the CPUs this process may use; the files
    themselves are read by one); the shards are the same for any value."""
    shard_chars: Annotated[int, Range(ge=1)] = 200_000_000
    """Characters of text per token shard (whole documents; about 4 characters a token). A kill
    while shards are written loses at most the shard in progress."""

    def source_files(self) -> list[Path]:
        """The user's files this data is read from (``dyt.train.data_files``): the corpus's (only those
        :func:`load_documents` reads: other files in its folder, a cache put there, are not data) and
        the tokenizer file, where given."""
        corpus = Path(self.corpus) if self.corpus else None
        if corpus is not None and corpus.is_dir():
            files = saved_dataset_files(corpus) if _is_saved_dataset(corpus) else sum(_text_files_and_tables(corpus), [])
        else:
            files = [corpus] if corpus is not None else []  # missing: recorded as missing
        return files + ([Path(self.tokenizer_file)] if self.tokenizer_file else [])


def _cache(cfg: DataConfig) -> Path:
    path = Path(cfg.cache_dir) if cfg.cache_dir else cache_root()
    with reported_as(DataError):
        return cache_folder(path)


def _not_utf8(paths: list[Path]) -> str:
    """The first of ``paths`` that is not UTF-8, named with the byte where it stops being so ('' for none)."""
    for path in paths:
        decoder = codecs.getincrementaldecoder("utf-8")()
        read = 0
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as error:
                    return f"{path} (byte {read + error.start})"
                read += len(block)
    return ""


def _read_utf8(path: Path) -> str:
    try:
        # a byte-order mark stays part of the text: one built-in work starts with one, and its tokens
        # (so every LLaMA figure) would change without it
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:  # inside datasets' generator it surfaced as a DatasetGenerationError naming nothing
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None


DOCUMENTS_VERSION = 1
"""Passed to the corpus readers below (``_text_files``, ``_numbered_titles``, ``_is_document``) as part of datasets' cache
key: datasets names a module's function by reference, so a changed reader would find the documents
its old code cached; raise it when one changes what it gives."""


def _utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding, kept by Python as surrogates
        return False
    return True


def _text_files(root: str, files: list[tuple], version: int = DOCUMENTS_VERSION):
    """One row per .txt file; ``files`` carries each path's :func:`_file_keys` so that datasets' cache
    of the generator changes when a file does (``version``: only a cache key)."""
    for path, *_ in files:
        yield {"title": str(Path(path).relative_to(root).with_suffix("")), "text": _read_utf8(Path(path))}


def _numbered_titles(batch, indices, version: int = DOCUMENTS_VERSION) -> dict[str, list[str]]:
    return {"title": [f"document-{i}" for i in indices]}


def _titles_filled(batch, indices, version: int = DOCUMENTS_VERSION) -> dict[str, list[str]]:
    return {"title": [f"document-{i}" if title is None else title for title, i in zip(batch["title"], indices)]}


def _is_document(batch, version: int = DOCUMENTS_VERSION) -> list[bool]:
    return [bool(text and text.strip()) for text in batch["text"]]  # a null text (JSON null) is empty too


def _document_table(table, where):
    """``table`` with a string ``text`` column and a ``title`` per document (numbered where it has
    none, or a row's is null; numbers as their text), or a DataError naming ``where``."""
    text = table.features.get("text")
    if text is None:
        raise DataError(f"{where}: documents need a 'text' column, found {table.column_names}")
    if getattr(text, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{where}: the 'text' column holds {getattr(text, 'dtype', text)}, not strings")
    if "title" not in table.column_names:
        return table.map(_numbered_titles, batched=True, with_indices=True, fn_kwargs={"version": DOCUMENTS_VERSION})
    import datasets

    title = table.features["title"]
    kind = getattr(title, "dtype", None)
    if not isinstance(title, datasets.Value) or not (
            kind in ("string", "large_string", "null") or kind.startswith(("int", "uint", "float"))):
        raise DataError(f"{where}: the 'title' column holds {kind or title}: give each document's title as text "
                        "(rows of one title are one document), or leave the column out to number the documents")
    if kind not in ("string", "large_string"):  # numbered titles (a book's id): their text; all null: none
        table = table.cast_column("title", datasets.Value("string"))
    if table.data.column("title").null_count:  # an untitled row is a document of its own, as without the column
        table = table.map(_titles_filled, batched=True, with_indices=True, fn_kwargs={"version": DOCUMENTS_VERSION})
    return table


def _nonempty_documents(table, cfg, where: str):
    """``table`` without its empty documents (each would be a bare ``<eos>`` in the token stream),
    or a DataError where nothing is left."""
    table = table.filter(_is_document, batched=True, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                         fn_kwargs={"version": DOCUMENTS_VERSION})
    if len(table) == 0:
        raise DataError(f"{where} has only empty documents")
    return table


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file()


CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _corpus_files(root: Path) -> FolderFiles:
    """A corpus folder's files, in one walk (every rank lists it; a corpus may hold millions):
    :func:`dyt_data.files_by_suffix`, so none under a hidden folder or hidden itself (an editor's
    ``.ipynb_checkpoints`` holds older copies of documents, which would train beside the documents
    they copy), linked folders entered, a link to nothing named."""
    return files_by_suffix(root, CORPUS_SUFFIXES, DataError)


def _text_files_and_tables(root: Path) -> tuple[list[Path], list[Path]]:
    """A corpus folder's documents: its .txt files, and its .jsonl / .parquet tables (:func:`_corpus_files`)."""
    found = _corpus_files(root).found
    return found[".txt"], found[".jsonl"] + found[".parquet"]


def _file_keys(paths: list[Path]) -> list[tuple[str, int, int, int]]:
    """Each path as found (titles are taken relative to the corpus folder) with its
    :func:`dyt_data.file_key`, so that a file changed in place changes the cache key."""
    return [(str(p), *file_key(p)[1:]) for p in paths]


def load_documents(cfg: DataConfig):
    """A ``datasets.DatasetDict`` with ``train`` and ``validation`` splits of whole documents
    (columns ``title``, ``text``), held on disk by datasets (memory-mapped), never as one list."""
    import datasets

    root = Path(cfg.corpus) if cfg.corpus else prepare_corpus()
    if not root.exists():
        raise DataError(f"corpus not found: {root}")
    if not root.is_dir():
        raise DataError(f"corpus {root} is a file: give data.corpus the folder that holds the corpus files")
    tables: list[Path] = []  # the .jsonl / .parquet files read, if any
    if _is_saved_dataset(root):
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            splits = set(loaded)
            if not splits <= {"train", "validation"} or "train" not in splits:
                raise DataError(f"corpus {root} is a DatasetDict of splits {sorted(splits)}: the recipe reads "
                                "'train' and, if there, 'validation'; save those (or one Dataset)")
            if "validation" in splits:
                if cfg.validation_works:
                    raise DataError(f"corpus {root} has a 'validation' split and data.validation_works names "
                                    "documents to hold out as well: give one of the two")
                return datasets.DatasetDict({s: _nonempty_documents(_document_table(loaded[s], f"{root} ({s})"), cfg,
                                                                    f"corpus {root}'s {s} split")
                                             for s in ("train", "validation")})
            loaded = loaded["train"]
        table = _document_table(loaded, root)
    else:
        listed = _corpus_files(root)
        texts, tables = listed.found[".txt"], listed.found[".jsonl"] + listed.found[".parquet"]
        if (others := listed.other_kinds()) and (texts or tables) and cfg.corpus:  # (the built-in one: our files)
            print(f"corpus {root}: reading {len(texts) + len(tables)} .txt / .jsonl / .parquet file(s); "
                  f"left out {others}", flush=True)
        if unnamed := next((p for p in texts if not _utf8_name(p)), None):
            raise DataError(f"{str(unnamed)!r}: a file name that is not UTF-8, which its document's title cannot hold: "
                            "rename the file")
        if texts and tables:
            raise DataError(f"corpus {root} holds both .txt files ({len(texts)}) and .jsonl / .parquet files "
                            f"({len(tables)}), and only one kind would be read: keep one kind per corpus folder")
        if texts:
            files = _file_keys(texts)
            try:
                table = datasets.Dataset.from_generator(
                    _text_files, gen_kwargs={"root": str(root), "files": files, "version": DOCUMENTS_VERSION},
                    features=datasets.Features({"title": datasets.Value("string"), "text": datasets.Value("string")}),
                    cache_dir=str(_cache(cfg) / "hf"))
            except datasets.exceptions.DatasetGenerationError as error:
                raise (error.__cause__ if isinstance(error.__cause__, DataError) else error) from None
        elif tables:
            if len({p.suffix for p in tables}) > 1:
                raise DataError(f"corpus {root} holds both .jsonl and .parquet files: keep one kind per corpus folder")
            kind = "json" if tables[0].suffix == ".jsonl" else "parquet"
            try:
                # datasets keys its cache by path and modification time: a folder of ours per _file_keys,
                # named by the corpus folder too, so that a change removes this corpus's older copies
                corpus_key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
                key = hashlib.sha256(json.dumps(_file_keys(tables)).encode()).hexdigest()[:16]
                tables_cache = _cache(cfg) / "hf" / f"tables-{corpus_key}-{key}"
                table = datasets.load_dataset(kind, data_files=[str(p) for p in tables], split="train",
                                              cache_dir=str(tables_cache))
                for older in tables_cache.parent.glob(f"tables-{corpus_key}-*"):
                    if older != tables_cache:
                        shutil.rmtree(older, ignore_errors=True)
            except datasets.exceptions.DatasetGenerationError as error:
                cause = error.__cause__ or error
                raise DataError(f"corpus {root}: its {kind} files do not read as one table "
                                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
            table = _document_table(table, root)
        else:
            raise DataError(f"corpus {root} has no .txt, .jsonl or .parquet files"
                            + (f" (it holds {others})" if others else " (hidden files and folders are not read)"))
    try:
        table = _nonempty_documents(table, cfg, f"corpus {root}")
    except UnicodeDecodeError as error:  # pyarrow reads a .jsonl's bytes as they are; the first decode fails
        found = _not_utf8(tables)
        raise DataError(f"corpus {root}: {found} is not UTF-8 text; save it as UTF-8" if found else
                        f"corpus {root}: a document is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    held_out = set(cfg.validation_works or ([] if cfg.corpus else BUILTIN_VALIDATION))
    documents = len(table)
    if held_out:  # one byte a document, titles read a batch at a time
        is_validation = np.zeros(len(table), dtype=bool)
        found, start = set(), 0
        # a name given as a file's (doc3.txt, or without its folders): the title it perhaps meant
        stems = {Path(name).stem.lower(): name for name in held_out}
        meant: dict[str, str] = {}
        for batch in table.select_columns(["title"]).iter(batch_size=10_000):
            chosen = [title in held_out for title in batch["title"]]
            is_validation[start : start + len(chosen)] = chosen
            found.update(t for t, c in zip(batch["title"], chosen) if c)
            for title in batch["title"]:
                if (name := stems.get(title.rsplit("/", 1)[-1].lower())) is not None and name != title:
                    meant.setdefault(name, title)
            start += len(chosen)
        if missing := sorted(held_out - found):
            hint = "; ".join(f"{name!r}: perhaps {meant[name]!r}" for name in missing if name in meant)
            raise DataError(f"validation_works not in the corpus: {missing} (a .txt file's title is its path under the "
                            f"corpus folder without .txt, e.g. 'books/emma'; {hint + '; ' if hint else ''}empty "
                            "documents are left out)")
    else:  # every 10th document, a run of rows with one title counting once: a chunked book stays whole
        is_validation = np.zeros(len(table), dtype=bool)
        documents, previous, start = 0, object(), 0
        for batch in table.select_columns(["title"]).iter(batch_size=10_000):
            chosen = []
            for title in batch["title"]:
                documents += title != previous
                previous = title
                chosen.append(documents % 10 == 0)  # the 10th, 20th, ... document
            is_validation[start : start + len(chosen)] = chosen
            start += len(chosen)
    if is_validation.all() or not is_validation.any():
        if is_validation.all():
            raise DataError(f"the split of corpus {root} leaves no training documents (data.validation_works holds "
                            "out every one): hold out fewer")
        raise DataError(f"the split of corpus {root} leaves no validation documents (every 10th document is held "
                        f"out, and it has {documents}{'' if documents == len(table) else f' in {len(table)} rows'}): "
                        "name the documents to hold out in data.validation_works")
    return datasets.DatasetDict(
        train=table.select(np.flatnonzero(~is_validation)),
        validation=table.select(np.flatnonzero(is_validation)),
    )


LONG_RUN = 1000
"""Characters of one kind (whitespace, or none) beyond which the BPE trains on a run in pieces."""
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{LONG_RUN + 1},}}|(?<!\s)\s{{{LONG_RUN + 1},}}")  # anchored: one pass


def _texts(docs, batch_size: int = 16):
    for batch in docs.select_columns(["text"]).iter(batch_size=batch_size):
        yield from batch["text"]


def _bpe_training_texts(docs, batch_size: int = 16):
    """The documents' texts as the BPE trains on them: a text with a run of more than :data:`LONG_RUN`
    characters without whitespace (a base64 blob, minified code, a sequence dump) or of whitespace is
    handed over in pieces cut every :data:`LONG_RUN` characters of such a run, since the trainer's
    time grows with the square of a word's length (measured: ``'x' * 100_000`` 6.6 s, a 5 MB run
    hours). Nothing is added to the text, and a text without such a run is as it is, so the BPE of
    ordinary text is unchanged; encoding is not affected (every run is encoded whole)."""
    for text in _texts(docs, batch_size):
        start = 0
        for run in _LONG_RUN.finditer(text):
            for cut in range(run.start() + LONG_RUN, run.end(), LONG_RUN):
                yield text[start:cut]
                start = cut
        yield text[start:]


def _has_long_runs(docs) -> bool:
    """Whether the BPE trains on any text in pieces (:func:`_bpe_training_texts`): part of its cache
    key, so a tokenizer trained on such text as a whole (before 2026-12-07) is not read back, while
    every other one still is."""
    return any(_LONG_RUN.search(text) for text in _texts(docs))


def load_tokenizer(cfg: DataConfig, train_docs, vocab_size: int, content_key: str):
    """The tokenizer file given, or a byte-level BPE trained on ``train_docs`` (cached by
    ``content_key``, the documents' content hash from :mod:`dyt_llama.prepare`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if cfg.tokenizer_file:
        path = _tokenizer_path(cfg)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises plain Exceptions from Rust
            reason = " ".join(str(error).split())[:200]
            raise DataError(f"{path} (data.tokenizer_file) is not a tokenizers JSON file: {reason}") from None
    else:
        pieces = ":long-runs-in-pieces" if _has_long_runs(train_docs) else ""
        key = hashlib.sha256(f"{TOKENIZER_VERSION}:{content_key}:{cfg.eos_token}{pieces}".encode()).hexdigest()[:16]
        path = _cache(cfg) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            tokenizer = None
            if path.is_file():
                try:
                    tokenizer = Tokenizer.from_file(str(path))
                except Exception:  # cut short by a kill before saves were renamed into place: trained again
                    path.unlink()
            if tokenizer is None:
                tokenizer = Tokenizer(models.BPE())
                tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tokenizer.decoder = decoders.ByteLevel()
                trainer = trainers.BpeTrainer(
                    vocab_size=vocab_size, special_tokens=[cfg.eos_token],
                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                    show_progress=False,
                )
                tokenizer.train_from_iterator(_bpe_training_texts(train_docs), trainer, length=len(train_docs))
                partial = partial_path(path)
                tokenizer.save(str(partial))
                partial.replace(path)  # whole or not at all: every later launch reads this file
    if tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than model.vocab_size={vocab_size}")
    if tokenizer.token_to_id(cfg.eos_token) is None:
        raise DataError(f"tokenizer {path} has no {cfg.eos_token!r} token (data.eos_token, which ends each document): "
                        "give its end-of-text token, e.g. --set data.eos_token='</s>' (LLaMA 1/2) or "
                        "'<|end_of_text|>' (Llama 3)")
    return tokenizer


def _tokenizer_path(cfg: DataConfig) -> Path:
    path = Path(cfg.tokenizer_file)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path} (data.tokenizer_file)")
    return path


DIGESTS_VERSION = 3
"""Passed to :func:`document_digests` by ``datasets.map`` as part of its cache key: datasets names a
module's function by reference, so a changed function would find its old results (2: ``text_digest``;
3: ``text_digest`` of the text without a byte-order mark and surrounding whitespace)."""


def document_digests(batch, version: int = DIGESTS_VERSION) -> dict[str, list[str]]:
    """SHA-256 of each document's title and text, and of its text alone (the copy check's: without a
    byte-order mark or whitespace around it, so a copy saved by another editor still matches; a
    ``datasets.map`` function; ``version``: only a cache key)."""
    return {"digest": [hashlib.sha256(title.encode() + b"\0" + text.encode() + b"\0").hexdigest()
                       for title, text in zip(batch["title"], batch["text"])],
            "text_digest": [hashlib.sha256(text.lstrip("\ufeff").strip().encode()).hexdigest() for text in batch["text"]],
            "chars": [len(text) for text in batch["text"]]}


class TokenWindows(torch.utils.data.Dataset):
    """Rows of ``seq_len + 1`` tokens (inputs and next-token targets) out of a token stream: row
    ``i`` starts at token ``i * seq_len``, so consecutive rows share one token and the incomplete
    tail is dropped. A row is read from the memory map when asked for, so a rank reads only the
    rows its sampler gives it."""

    def __init__(self, shards: TokenShards, seq_len: int):
        self.shards, self.seq_len = shards, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.shards) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return torch.from_numpy(self.shards.read(index * self.seq_len, self.seq_len + 1).astype(np.int64))


def build_datasets(cfg: DataConfig, vocab_size: int, max_seq_len: int):
    """(train rows, validation rows, tokenizer); every input error raised here, before training.
    Builds the token shards when they are missing (``dyt-llama-prepare`` builds them ahead)."""
    from .prepare import prepare

    if cfg.seq_len > max_seq_len:
        raise DataError(f"data.seq_len={cfg.seq_len} exceeds the model's context (model.max_seq_len={max_seq_len})")
    if cfg.seq_len < 2:
        raise DataError(f"data.seq_len must be at least 2, got {cfg.seq_len}")
    if cfg.corpus and not Path(cfg.corpus).exists():  # the cheap checks first
        raise DataError(f"corpus not found: {cfg.corpus} (data.corpus)")
    if cfg.tokenizer_file:
        _tokenizer_path(cfg)
    prepared = prepare(cfg, vocab_size)
    train, validation = (TokenWindows(prepared.shards[s], cfg.seq_len) for s in ("train", "validation"))
    for name, rows in (("training", train), ("validation", validation)):
        if len(rows) == 0:
            raise DataError(f"the {name} documents hold {len(rows.shards)} tokens, fewer than the {cfg.seq_len + 1} "
                            "of one sequence (data.seq_len + 1): give more text, or lower data.seq_len")
    return train, validation, prepared.tokenizer
