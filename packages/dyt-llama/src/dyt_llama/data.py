"""Text data: local files (txt / jsonl / parquet) or a saved ``datasets`` dir, split by document,
a BPE tokenizer trained on the training documents (or loaded), documents packed into fixed-length
sequences. Everything is cached (``datasets``' own cache plus our tokenizer files), so a second run
starts at once; a file lock keeps concurrent ranks from building the same cache twice."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from filelock import FileLock

from dyt.train.config import Range

from .corpus import DataError, default_cache, prepare_corpus

EOS = "<eos>"
BUILTIN_VALIDATION = ["shakespeare/hamlet", "shakespeare/tempest", "austen/persuasion"]


@dataclass
class DataConfig:
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
    seq_len: Annotated[int, Range(ge=2)] = 128
    """Tokens per training sequence (at most model.max_seq_len)."""
    cache_dir: str = ""
    """Default: $DYT_CACHE (~/.cache/dyt)."""


def _cache(cfg: DataConfig) -> Path:
    path = Path(cfg.cache_dir) if cfg.cache_dir else default_cache()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cache folder {path} (data.cache_dir or $DYT_CACHE) cannot be created: {error.strerror}") from None
    return path


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason})") from None


def load_documents(cfg: DataConfig):
    """A ``datasets.DatasetDict`` with ``train`` and ``validation`` splits of whole documents
    (columns ``title``, ``text``)."""
    import datasets

    root = Path(cfg.corpus) if cfg.corpus else prepare_corpus()
    if not root.exists():
        raise DataError(f"corpus not found: {root}")
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict) and {"train", "validation"} <= set(loaded):
            return loaded
        table = loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        texts = sorted(root.rglob("*.txt"))
        tables = sorted(root.rglob("*.jsonl")) + sorted(root.rglob("*.parquet"))
        if texts:
            titles = [str(p.relative_to(root).with_suffix("")) for p in texts]
            table = datasets.Dataset.from_dict({"title": titles, "text": [_read_utf8(p) for p in texts]})
        elif tables:
            kind = "json" if tables[0].suffix == ".jsonl" else "parquet"
            table = datasets.load_dataset(kind, data_files=[str(p) for p in tables], split="train")
            if "text" not in table.column_names:
                raise DataError(f"{root}: files need a 'text' column, found {table.column_names}")
            if "title" not in table.column_names:
                table = table.add_column("title", [f"document-{i}" for i in range(len(table))])
        else:
            raise DataError(f"corpus {root} has no .txt, .jsonl or .parquet files")
    table = table.filter(lambda row: bool(row["text"].strip()))
    if len(table) == 0:
        raise DataError(f"corpus {root} has only empty documents")
    held_out = set(cfg.validation_works or ([] if cfg.corpus else BUILTIN_VALIDATION))
    if held_out:
        missing = held_out - set(table["title"])
        if missing:
            raise DataError(f"validation_works not in the corpus: {sorted(missing)}")
        is_validation = [title in held_out for title in table["title"]]
    else:
        is_validation = [i % 10 == 9 for i in range(len(table))]
    if all(is_validation) or not any(is_validation):
        raise DataError(f"the split leaves no {'training' if all(is_validation) else 'validation'} documents")
    split = datasets.DatasetDict(
        train=table.select([i for i, v in enumerate(is_validation) if not v]),
        validation=table.select([i for i, v in enumerate(is_validation) if v]),
    )
    return split


def load_tokenizer(cfg: DataConfig, train_docs, vocab_size: int):
    """The tokenizer file given, or a byte-level BPE trained on ``train_docs`` (cached by content)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if cfg.tokenizer_file:
        path = _tokenizer_path(cfg)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises plain Exceptions from Rust
            reason = " ".join(str(error).split())[:200]
            raise DataError(f"{path} (data.tokenizer_file) is not a tokenizers JSON file: {reason}") from None
    else:
        path = _cache(cfg) / "tokenizers" / f"bpe-{vocab_size}-{_content_key(train_docs)[:16]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                tokenizer = Tokenizer.from_file(str(path))
            else:
                tokenizer = Tokenizer(models.BPE())
                tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tokenizer.decoder = decoders.ByteLevel()
                trainer = trainers.BpeTrainer(
                    vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                    show_progress=False,
                )
                tokenizer.train_from_iterator(train_docs["text"], trainer)
                tokenizer.save(str(path))
    if tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than model.vocab_size={vocab_size}")
    if tokenizer.token_to_id(EOS) is None:
        raise DataError(f"tokenizer {path} has no {EOS} token")
    return tokenizer


def _tokenizer_path(cfg: DataConfig) -> Path:
    path = Path(cfg.tokenizer_file)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path} (data.tokenizer_file)")
    return path


def _content_key(docs) -> str:
    digest = hashlib.sha256()
    for title, text in zip(docs["title"], docs["text"]):
        digest.update(title.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


def pack(docs, tokenizer, seq_len: int, cache: Path):
    """Documents -> rows of ``seq_len + 1`` token ids (inputs and next-token targets), each document
    followed by <eos>, concatenated in order; the incomplete tail is dropped. Cached on disk by
    (documents, tokenizer, seq_len)."""
    import datasets

    key = hashlib.sha256((_content_key(docs) + tokenizer.to_str() + str(seq_len)).encode()).hexdigest()[:24]
    path = cache / "packed" / key
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    eos = tokenizer.token_to_id(EOS)

    def chunk(batch):
        stream: list[int] = []
        for encoding in tokenizer.encode_batch(batch["text"]):
            stream.extend(encoding.ids)
            stream.append(eos)
        return {"input_ids": [stream[i : i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len)]}

    rows = docs.map(chunk, batched=True, batch_size=len(docs), remove_columns=docs.column_names,
                    desc="tokenising and packing")
    rows.save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows.with_format("torch")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.rows[index]["input_ids"]


def build_datasets(cfg: DataConfig, vocab_size: int, max_seq_len: int):
    """(train rows, validation rows, tokenizer); every input error raised here, before training."""
    if cfg.seq_len > max_seq_len:
        raise DataError(f"data.seq_len={cfg.seq_len} exceeds the model's context (model.max_seq_len={max_seq_len})")
    if cfg.seq_len < 2:
        raise DataError(f"data.seq_len must be at least 2, got {cfg.seq_len}")
    if cfg.corpus and not Path(cfg.corpus).exists():  # the cheap checks first
        raise DataError(f"corpus not found: {cfg.corpus} (data.corpus)")
    if cfg.tokenizer_file:
        _tokenizer_path(cfg)
    with FileLock(str(_cache(cfg) / "data.lock")):
        docs = load_documents(cfg)
        tokenizer = load_tokenizer(cfg, docs["train"], vocab_size)
        train, validation = (pack(docs[s], tokenizer, cfg.seq_len, _cache(cfg)) for s in ("train", "validation"))
    for name, rows in (("training", train), ("validation", validation)):
        if len(rows) == 0:
            raise DataError(f"the {name} documents hold fewer than {cfg.seq_len + 1} tokens")
    return TokenRows(train), TokenRows(validation), tokenizer
