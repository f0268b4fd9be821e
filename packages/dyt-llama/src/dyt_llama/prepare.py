"""Token shards for LLaMA pretraining: each split's documents tokenised with ``datasets.map``
(``num_proc`` processes), every document followed by <eos>, into memory-mapped shards under
``<cache>/tokens/<key>/`` (:mod:`dyt_data.shards`: uint16 ids when the vocabulary fits, else uint32,
and ``index.json``). Memory stays flat with corpus size: documents are read from datasets' on-disk
tables a batch at a time and each worker appends its tokens to a file. A killed run picks up at the
shard it was writing. Training calls this itself when the shards are missing; ``dyt-llama-prepare``
(``python -m dyt_llama.prepare``) builds them ahead, e.g. with more processes::

    dyt-llama-prepare --config recipes/llama/tiny.yaml --num-proc 8
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from dyt.errors import CommandParser, help_description, user_errors, user_path
from dyt.train.data_files import files_signature
from dyt.train.jsonio import read_json, write_json, write_text_whole
from dyt_data import reported_as, worker_processes
from dyt_data.shards import FORMAT as SHARDS_FORMAT
from dyt_data.shards import TokenShards, plan_by_size, token_dtype, write_shards
from dyt_data.shards import complete as shards_complete

from .data import (
    BYTE_BPE_MIN_VOCAB,
    DIGESTS_VERSION,
    DOCUMENTS_VERSION,
    TOKENIZER_VERSION,
    DataConfig,
    DataError,
    _cache,
    _file_keys,
    document_digests,
    load_documents,
    load_tokenizer,
)

SPLITS = ("train", "validation")
ENCODE_CHARS = 1 << 18
"""Characters handed to the tokenizer at once: its encodings take about 200 bytes a character, so
this bounds their memory. A longer document is encoded in pieces cut between two words where that
gives the tokens of the whole (:func:`cuts_exactly`); with another tokenizer, whole."""

WORD_GAP = re.compile(r"(?<=[A-Za-z0-9])(?= [A-Za-z0-9])|(?<=[A-Za-z0-9]\n)(?=[A-Za-z0-9])")
"""Where a document may be cut for a byte-level BPE (the GPT-2 split: a space goes with the word after
it, a line break is a word of its own): before a single space between two letters or digits, or after a
line break between them. ASCII on both sides, so that no reading of "whitespace" differs from the
tokenizer's."""


def cuts_exactly(tokenizer) -> bool:
    """A document cut at a :data:`WORD_GAP` encodes, piece by piece, to its tokens as a whole: a
    byte-level BPE with the GPT-2 split, no prefix space, no normalizer, no tokens added around each
    text, no truncation or padding, and added tokens that hold no whitespace nor take the whitespace
    beside them (the BPE this recipe trains). Another tokenizer (a SentencePiece conversion's prefix,
    a template adding ``<s>``, an added token ``New York``) could change tokens at a cut."""
    spec = json.loads(tokenizer.to_str())
    pre, post = spec.get("pre_tokenizer") or {}, spec.get("post_processor")
    # an added token matched across a cut ("New York"), or one that takes the whitespace beside it
    added_whole = all(not any(c.isspace() for c in token["content"]) and not token.get("lstrip")
                      and not token.get("rstrip") and not token.get("single_word") for token in spec.get("added_tokens", []))
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
            and pre.get("use_regex", True) and (post is None or post.get("type") == "ByteLevel") and added_whole
            and spec.get("truncation") is None and spec.get("padding") is None)


def _pieces(text: str, limit: int):
    """``text`` in pieces of about ``limit`` characters or fewer, cut at a :data:`WORD_GAP` in the second
    half of each (past it where there is none there; a text without one stays whole)."""
    start = 0
    while len(text) - start > limit:
        cut = None
        for match in WORD_GAP.finditer(text, start + limit // 2, start + limit):
            cut = match.start()
        if cut is None:
            match = WORD_GAP.search(text, start + limit)
            if match is None:
                break
            cut = match.start()
        yield text[start:cut]
        start = cut
    yield text[start:]


@dataclass
class Prepared:
    shards: dict[str, TokenShards]
    tokenizer: object


def _groups(units: list[tuple[bool, str]], limit: int):
    group, size = [], 0
    for unit in units:
        if group and size + len(unit[1]) > limit:
            yield group
            group, size = [], 0
        group.append(unit)
        size += len(unit[1])
    if group:
        yield group


def _tokenise(batch, rank, tokenizer, eos: int, dtype: str, prefix: str, cut: bool = False) -> dict[str, list[int]]:
    """Append the batch's tokens (each document + <eos>) to this worker's part file; return each
    document's token count. datasets gives worker ``rank`` a contiguous run of documents in
    order, so the parts concatenated by rank are the documents in order. ``cut``: a document longer
    than :data:`ENCODE_CHARS` is encoded in pieces (:func:`cuts_exactly` the tokenizer)."""
    units = []  # (last piece of its document?, text)
    for text in batch["text"]:
        pieces = list(_pieces(text, ENCODE_CHARS)) if cut and len(text) > ENCODE_CHARS else [text]
        units += [(i == len(pieces) - 1, piece) for i, piece in enumerate(pieces)]
    counts, running = [], 0
    with open(f"{prefix}.part{rank or 0:04d}", "ab") as out:
        for group in _groups(units, ENCODE_CHARS):
            pieces = []
            for (last, _), encoding in zip(group, tokenizer.encode_batch_fast([text for _, text in group]), strict=True):
                pieces.append(encoding.ids)
                running += len(encoding.ids)
                if last:
                    pieces.append([eos])
                    counts.append(running + 1)
                    running = 0
            out.write(np.concatenate(pieces).astype(dtype, copy=False))  # not tofile: a full disk raises ENOSPC, not a short write
    return {"tokens": counts}


SURVEYS_VERSION = 1
"""Part of the key of the surveys' records (:func:`_survey`, :func:`_checked_unseen`): raise it when
what they record changes."""


def _record_path(records: Path, *parts) -> Path:
    return records / (hashlib.sha256(json.dumps([SURVEYS_VERSION, *parts]).encode()).hexdigest()[:24] + ".json")


def _survey(docs, num_proc: int, shard_chars: int, name: str, records: Path, files: str):
    """(the documents' content key, the shard plan, the per-document digests): one pass over the text
    in ``num_proc`` processes (cached by datasets), then the small per-document results a batch at a time.
    The key and plan are recorded under ``records`` by the digests' fingerprint, the shard size and
    ``files`` (the corpus files' sizes and times), so every later rank and launch on this data reads
    them instead of passing over every document again (~1.4 us a document, one rank after another
    under the data lock: minutes a rank on a web corpus)."""
    stats = docs.map(document_digests, batched=True, batch_size=64, num_proc=num_proc if num_proc > 1 else None,
                     fn_kwargs={"version": DIGESTS_VERSION},
                     remove_columns=docs.column_names, desc=f"reading {name} documents")
    record = _record_path(records, "survey", stats._fingerprint, shard_chars, files)
    saved = read_json(record)
    if isinstance(saved, dict) and {"content", "plan"} <= saved.keys():
        return saved["content"], saved["plan"], stats
    content, plan = _content_and_plan(stats, shard_chars)
    write_json(record, {"content": content, "plan": plan})
    return content, plan, stats


def _content_and_plan(stats, shard_chars: int) -> tuple[str, list[list[int]]]:
    content, sizes = hashlib.sha256(), []
    for batch in stats.with_format("numpy").iter(batch_size=100_000):
        content.update("".join(batch["digest"].tolist()).encode())
        sizes.append(batch["chars"])
    return content.hexdigest(), plan_by_size(np.concatenate(sizes) if sizes else [], shard_chars)


def _checked_unseen(docs, stats, records: Path, files: str) -> None:
    """:func:`check_validation_unseen`, once per pair of splits: a pass is recorded under ``records``
    (as :func:`_survey`'s), so later ranks and launches skip the comparison."""
    record = _record_path(records, "unseen", stats["train"]._fingerprint, stats["validation"]._fingerprint, files)
    if read_json(record) is True:
        return
    check_validation_unseen(docs, stats)
    write_json(record, True)


_HEX_VALUES = np.zeros(256, np.uint64)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)


def _digest_keys(column) -> np.ndarray:
    """The first 64 bits of each hex SHA-256 digest of ``column`` (an arrow string array), as uint64:
    8 bytes a document where a digest string and a title take a few hundred. Read from arrow's
    buffers: no Python string per document."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if not len(chunk):
            continue
        heads = pc.utf8_slice_codeunits(chunk, 0, 16)  # the first 16 hex digits, packed one after another
        width = np.int64 if pa.types.is_large_string(heads.type) else np.int32
        offsets = np.frombuffer(heads.buffers()[1], width)[heads.offset:heads.offset + len(heads) + 1]
        if heads.null_count == 0 and offsets[-1] - offsets[0] == 16 * len(heads):
            text = np.frombuffer(heads.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
        else:  # not 64-digit hex digests: none of _survey's
            raise ValueError(f"not SHA-256 hex digests: {chunk.slice(0, 3).to_pylist()}")
        nibbles = _HEX_VALUES[text].reshape(-1, 16)
        keys.append(np.bitwise_or.reduce(nibbles << np.arange(60, -4, -4, dtype=np.uint64), axis=1))
    return np.concatenate(keys) if keys else np.zeros(0, np.uint64)


def _digest_batches(stats):
    """``stats``'s ``text_digest`` column, a million rows at a time, as arrow arrays."""
    for batch in stats.select_columns(["text_digest"]).with_format("arrow").iter(batch_size=1_000_000):
        yield batch.column("text_digest")


def check_validation_unseen(docs, stats) -> None:
    """A validation document whose text is a training document's (one text under two titles or
    files, a duplicated row) would validate on trained text: a DataError naming the first pair.
    ``stats``: each split's :func:`_survey` digests. Memory is 8 bytes a validation document: the
    first 64 bits of each digest are held, the training split's compared a batch at a time, and only
    the documents they match are compared by their whole digests."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(docs["train"]) or not len(docs["validation"]):  # nothing to compare; build_datasets says what is empty
        return
    held = np.unique(np.concatenate([_digest_keys(column) for column in _digest_batches(stats["validation"])]))
    candidates: dict[str, int] = {}  # whole digest -> the first training index with it, where its 64 bits match
    start = 0
    for column in _digest_batches(stats["train"]):
        keys = _digest_keys(column)
        for index in np.flatnonzero(held[np.minimum(np.searchsorted(held, keys), len(held) - 1)] == keys):
            candidates.setdefault(column[int(index)].as_py(), start + int(index))
        start += len(column)
    if not candidates:
        return
    wanted, first, count, start = pa.array(list(candidates), pa.string()), None, 0, 0
    for column in _digest_batches(stats["validation"]):  # the candidates' whole digests: 64 bits can collide
        hits = pc.indices_nonzero(pc.is_in(column, value_set=wanted)).to_numpy()
        if len(hits) and first is None:
            first = start + int(hits[0]), column[int(hits[0])].as_py()
        count, start = count + len(hits), start + len(column)
    if first is not None:
        where, digest = first
        raise DataError(f"{count} validation document(s) have the text of a training document; first: validation "
                        f"{docs['validation'][where]['title']!r} = training {docs['train'][candidates[digest]]['title']!r}: "
                        "validation must be text training never reads (deduplicate the corpus, or hold out every "
                        "copy: data.validation_works)")


def _write_split(docs, content: str, plan: list[list[int]], tokenizer, tokenizer_key: str, eos_token: str,
                 folder_root: Path, num_proc: int, name: str) -> TokenShards:
    import datasets
    from tqdm.auto import tqdm

    processes = num_proc if num_proc > 1 else None
    # every input of the stream is in the key, the plan (shard boundaries, from data.shard_chars) too:
    # another gets a folder of its own, never rewrites one a running job memory-maps with the old offsets
    eos = tokenizer.token_to_id(eos_token)
    folder = folder_root / hashlib.sha256(f"{content}:{tokenizer_key}:{eos}:{json.dumps(plan)}".encode()).hexdigest()[:24]
    dtype = token_dtype(tokenizer.get_vocab_size())
    cut = cuts_exactly(tokenizer)

    def write_shard(first: int, end: int, path: Path) -> list[int]:
        prefix = str(path) + ".tokens"
        for stale in path.parent.glob(Path(prefix).name + ".part*"):
            stale.unlink()
        piece = docs.select(range(first, end))
        counts = piece.map(
            _tokenise, batched=True, batch_size=16, with_rank=True, num_proc=min(processes or 1, len(piece)) if processes else None,
            remove_columns=piece.column_names, keep_in_memory=True, load_from_cache_file=False,
            new_fingerprint=hashlib.sha256(f"{folder}:{first}:{end}".encode()).hexdigest()[:16],
            fn_kwargs={"tokenizer": tokenizer, "eos": eos, "dtype": dtype.name, "prefix": prefix, "cut": cut},
        )["tokens"]
        parts = sorted(path.parent.glob(Path(prefix).name + ".part*"))
        with open(path, "wb") as out:
            for part in parts:
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 22)
                part.unlink()
        return list(counts)

    meta = {"tokenizer_sha256": tokenizer_key, "content_sha256": content, "vocab_size": tokenizer.get_vocab_size(),
            "eos": eos, "split": name}
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar for the split, not one per shard
    try:
        with tqdm(total=len(docs), desc=f"token shards ({name})", unit="doc", dynamic_ncols=True) as bar:
            write_shards(folder, plan, write_shard, dtype, meta, progress=bar.update)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return TokenShards(folder)


def prepare(cfg: DataConfig, vocab_size: int) -> Prepared:
    """Documents, tokenizer and both splits' token shards, built once under a file lock. For a corpus of
    the user's, the finished preparation is recorded (:func:`_done_record`), so the other ranks, and
    later launches, open the shards without the lock and without reading the corpus again: only the
    corpus files are stat'ed (every rank of a large launch used to read the whole corpus in turn)."""
    if not cfg.tokenizer_file and vocab_size < BYTE_BPE_MIN_VOCAB:  # before the corpus is read
        raise DataError(f"model.vocab_size={vocab_size} is below the {BYTE_BPE_MIN_VOCAB} tokens the byte-level BPE "
                        "starts with (256 bytes and the end-of-text token): raise it, or give data.tokenizer_file")
    cache = _cache(cfg)
    done = _done_record(cache, cfg, vocab_size)
    if (ready := _ready(done)) is not None:  # no lock, no corpus read: what every rank after the first finds
        return ready
    with FileLock(str(cache / "data.lock")), reported_as(DataError, cache):  # a full disk: one line
        if (ready := _ready(done)) is not None:  # built while this rank waited
            return ready
        docs = load_documents(cfg)
        processes = worker_processes(cfg.num_proc, "data.num_proc")
        records, files = cache / "surveys", files_signature(cfg.source_files())["digest"]
        records.mkdir(parents=True, exist_ok=True)
        surveys = {name: _survey(docs[name], processes, cfg.shard_chars, name, records, files) for name in SPLITS}
        _checked_unseen(docs, {name: survey[2] for name, survey in surveys.items()}, records, files)
        tokenizer = load_tokenizer(cfg, docs["train"], vocab_size, content_key=surveys["train"][0])
        if processes > 1:  # the worker processes are the tokenising's parallelism; set only now, as the BPE
            # trains on every core (1.6x faster on 2 cores than with the setting in force)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tokenizer_key = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
        shards = {name: _write_split(docs[name], *surveys[name][:2], tokenizer, tokenizer_key, cfg.eos_token,
                                     cache / "tokens", processes, name) for name in SPLITS}
        if done is not None:
            done.parent.mkdir(parents=True, exist_ok=True)
            write_text_whole(done.with_suffix(".tokenizer.json"), tokenizer.to_str())
            write_json(done, {name: str(shards[name].folder) for name in SPLITS})
    return Prepared(shards, tokenizer)


PREPARED_VERSION = 1


def _done_record(cache: Path, cfg: DataConfig, vocab_size: int) -> Path | None:
    """Where a finished preparation of a corpus of the user's records its shard folders and tokenizer,
    keyed by every data setting but ``num_proc`` and ``cache_dir`` (where it lives), the corpus
    files' paths, sizes, modification and change times (a copy that kept the modification time
    changes the last: ``dyt_data.file_key``), and the versions of the code that reads them. None for the built-in corpus (small; its text comes from packages,
    which the key would not see change)."""
    if not cfg.corpus or not Path(cfg.corpus).exists():  # missing: the preparation names it
        return None
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("num_proc", "cache_dir")}
    key = json.dumps([PREPARED_VERSION, SURVEYS_VERSION, DIGESTS_VERSION, DOCUMENTS_VERSION, TOKENIZER_VERSION,
                      SHARDS_FORMAT, settings, vocab_size, _file_keys(cfg.source_files())], sort_keys=True, default=str)
    return cache / "prepared" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _ready(done: Path | None) -> Prepared | None:
    """The preparation ``done`` records, where both splits' shards are complete and untouched."""
    if done is None:
        return None
    folders = read_json(done)
    tokenizer_file = done.with_suffix(".tokenizer.json")
    if not isinstance(folders, dict) or set(folders) != set(SPLITS) or not tokenizer_file.is_file():
        return None
    if not all(shards_complete(Path(folders[name])) for name in SPLITS):
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception:  # the tokenizers library raises plain Exceptions from Rust; rebuilt under the lock
        return None
    return Prepared({name: TokenShards(Path(folders[name])) for name in SPLITS}, tokenizer)


@user_errors("dyt-llama-prepare")
def main(argv: list[str] | None = None) -> None:
    from dyt.train import load_config
    from dyt.train.config import AT_LEAST_ONE

    from .task import LlamaConfig

    parser = CommandParser(prog="dyt-llama-prepare", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=user_path, default=None, help="a LLaMA recipe YAML (its model: and data: sections)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--num-proc", type=AT_LEAST_ONE.arg(int), default=None,
                        help="tokenising processes (default: data.num_proc)")
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"data.num_proc={args.num_proc}"] if args.num_proc is not None else [])
    config = load_config(LlamaConfig, args.config, overrides)
    prepared = prepare(config.data, config.model.vocab_size)
    for name, shards in prepared.shards.items():
        index = shards.index
        print(f"{name}: {index['tokens']} tokens of {index['documents']} documents in {len(index['shards'])} "
              f"{index['dtype']} shard(s), {shards.folder}")


if __name__ == "__main__":
    main()
