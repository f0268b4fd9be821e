"""A token stream on disk: numbered shards of raw token ids (uint16 when the vocabulary fits, else
uint32) read through ``numpy.memmap``, and ``index.json`` naming each shard's file, token count,
SHA-256, and the documents it holds; each shard's document boundaries go in ``<name>.ends.npy``
beside it (``index.json`` holds no per-document list, so opening a stream costs the same whatever
the number of documents: every rank and DataLoader worker reads it).

Writing goes one shard at a time, so memory stays flat whatever the corpus size. Each shard is
written to ``<name>.<host>.<pid>.tmp`` and renamed when complete, then its sidecar ``<name>.json`` records its
checksum. A rerun after a kill keeps every shard whose sidecar and checksum agree and redoes the
rest; ``index.json`` is written last, so its presence means the whole stream is there. A complete
stream is reused while every shard file keeps the size and modification time recorded in
``stamps.json`` (a stat each); a shard cut short, zeroed or rewritten since is checked by its sha256
and written again, never read as tokens.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .cache import file_sha256

FORMAT = 2
"""2: document boundaries in ``.ends.npy`` files, not in ``index.json`` (1: a JSON list of every
document's end, ~47 bytes a document loaded by every reader)."""
INDEX = "index.json"
PLAN = "plan.json"
STAMPS = "stamps.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds ids ``0 .. vocab_size - 1``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _write_json(path: Path, value) -> None:
    """Write then rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(_partial_name(path.name))
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _partial_name(name: str) -> str:
    """A file's name while it is written, by host and process (as ``dyt.train.jsonio.partial_path``
    names them; dyt-data does not depend on dyt-core). Builders are kept apart by the cache's
    lock, which needs ``flock`` to hold across the nodes sharing the cache (docs/errors.md); a build
    clears every partial file of a shard, whoever left it, before writing that shard."""
    return f"{name}.{socket.gethostname()}.{os.getpid()}.tmp"


def _finished(folder: Path, name: str, dtype: np.dtype, documents: list[int]) -> dict | None:
    """The sidecar of a complete, intact shard, or None (missing, partial or corrupt: redo it)."""
    sidecar, data, ends = folder / f"{name}.json", folder / f"{name}.bin", folder / f"{name}.ends.npy"
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if (record.get("documents") != documents or not data.is_file() or not ends.is_file()
            or data.stat().st_size != record.get("tokens", -1) * dtype.itemsize):
        return None
    return record if file_sha256(data) == record.get("sha256") else None


def _stamps(folder: Path, shards: Sequence[dict]) -> dict[str, list[int]]:
    """Each shard file's size and modification time, as written or last verified by its sha256."""
    stamps = {}
    for shard in shards:
        try:
            stat = (folder / shard["file"]).stat()
        except OSError:
            continue
        stamps[shard["file"]] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _untouched(folder: Path, shards: Sequence[dict]) -> bool:
    """Every shard file of a complete stream still has the size and modification time it had when
    written or last verified (``STAMPS``): a stat per shard, so reusing a large stream stays instant,
    while a file cut short, zeroed or rewritten in place since is caught (and then checked by sha256)."""
    try:
        stamps = json.loads((folder / STAMPS).read_text())
    except (OSError, ValueError):
        return False
    return _stamps(folder, shards) == stamps


def complete(folder: Path) -> bool:
    """A stream written whole and untouched since (``index.json`` of this format, every shard's size
    and time as recorded): what a reader may open without rebuilding or checking it."""
    try:
        index = json.loads((Path(folder) / INDEX).read_text())
    except (OSError, ValueError):
        return False
    return index.get("format") == FORMAT and _untouched(Path(folder), index.get("shards", []))


WriteShard = Callable[[int, int, Path], Sequence[int]]
"""``(first_document, end_document, path) -> tokens per document``: write the tokens of documents
``first .. end - 1`` to ``path`` (raw ids of the stream's dtype), in order."""


def write_shards(folder: Path, plan: Sequence[Sequence[int]], write_shard: WriteShard, dtype: np.dtype,
                 meta: dict, progress: Callable[[int], None] | None = None) -> dict:
    """Write (or finish) the stream in ``folder``: shard ``i`` holds documents ``plan[i]``.
    ``meta`` (tokenizer hash, content key, ...) goes into the index; a folder holding another plan
    or meta is cleared first. ``progress(documents)`` is called after each shard, kept or written.
    Returns the index."""
    folder = Path(folder)
    dtype = np.dtype(dtype)
    plan = [[int(a), int(b)] for a, b in plan]
    wanted = {"format": FORMAT, "dtype": dtype.name, "meta": meta, "plan": plan}
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        if {k: index.get(k) for k in wanted} == wanted and _untouched(folder, index["shards"]):
            if progress:
                progress(plan[-1][1] - plan[0][0] if plan else 0)
            return index
        # A shard cut short, rewritten or deleted since: each shard is checked below (size, sha256)
        # and the damaged ones written again, instead of training on what is there.
    try:
        same_plan = json.loads((folder / PLAN).read_text()) == wanted
    except (OSError, ValueError):
        same_plan = False
    if not same_plan and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / PLAN, wanted)
    shards = []
    for number, (first, end) in enumerate(plan):
        name = f"shard-{number:05d}"
        record = _finished(folder, name, dtype, [first, end])
        if record is None:
            for stale in [*folder.glob(f"{name}.bin.*.tmp*"), *folder.glob(f"{name}.ends.npy.*.tmp")]:
                stale.unlink()  # a killed build's partial shard, token parts and ends (any host or process)
            tmp = folder / _partial_name(f"{name}.bin")
            counts = [int(c) for c in write_shard(first, end, tmp)]
            if len(counts) != end - first:
                raise RuntimeError(f"{name}: {len(counts)} document token counts for {end - first} documents")
            written = tmp.stat().st_size // dtype.itemsize
            if written != sum(counts):
                raise RuntimeError(f"{name}: {written} tokens written, the documents add up to {sum(counts)}")
            os.replace(tmp, folder / f"{name}.bin")
            ends_tmp = folder / _partial_name(f"{name}.ends.npy")
            with open(ends_tmp, "wb") as handle:
                np.save(handle, np.cumsum(np.asarray(counts, dtype=np.int64)))
            os.replace(ends_tmp, folder / f"{name}.ends.npy")
            record = {"file": f"{name}.bin", "tokens": written, "sha256": file_sha256(folder / f"{name}.bin"),
                      "documents": [first, end], "ends_file": f"{name}.ends.npy"}
            _write_json(folder / f"{name}.json", record)
        shards.append(record)
        if progress:
            progress(end - first)
    index = {**wanted, "tokens": sum(s["tokens"] for s in shards), "documents": plan[-1][1] - plan[0][0] if plan else 0,
             "shards": shards}
    _write_json(folder / STAMPS, _stamps(folder, shards))
    _write_json(folder / INDEX, index)
    return index


def plan_by_size(sizes: Sequence[int], target: int) -> list[list[int]]:
    """Consecutive document ranges of about ``target`` (characters, bytes...) each; a document is
    never split, so a shard may exceed ``target`` by one document."""
    plan, first, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += int(size)
        if total >= target:
            plan.append([first, i + 1])
            first, total = i + 1, 0
    if first < len(sizes):
        plan.append([first, len(sizes)])
    return plan


class TokenShards:
    """A written stream, read through memory maps opened on first use (per process: safe to pickle
    into DataLoader workers). ``read(start, length)`` copies tokens out, across shard ends."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as error:
            raise FileNotFoundError(f"{self.folder}: no complete token shards ({INDEX} missing or unreadable)") from error
        self.dtype = np.dtype(self.index["dtype"])
        sizes = [s["tokens"] for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._maps: list[np.memmap | None] = [None] * len(sizes)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self._maps)}

    def _shard(self, number: int) -> np.ndarray:
        if self._maps[number] is None:
            shard = self.index["shards"][number]
            self._maps[number] = np.memmap(self.folder / shard["file"], dtype=self.dtype, mode="r",
                                           shape=(shard["tokens"],)) if shard["tokens"] else np.zeros(0, self.dtype)
        return self._maps[number]

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens {start}..{start + length} outside a stream of {len(self)}")
        if length == 0:
            return np.zeros(0, self.dtype)
        pieces, position, end = [], start, start + length
        number = bisect.bisect_right(self.starts, position) - 1
        while position < end:
            while self.starts[number + 1] <= position:  # skip empty shards
                number += 1
            stop = min(end, self.starts[number + 1])
            pieces.append(self._shard(number)[position - self.starts[number] : stop - self.starts[number]])
            position, number = stop, number + 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.array(pieces[0])

    def document_ends(self) -> np.ndarray:
        """Where each document's tokens end in the stream (cumulative, int64), read from the shards'
        ``.ends.npy`` files (nothing in training reads them: tests and tools do)."""
        ends = [np.load(self.folder / s["ends_file"]) + start for s, start in zip(self.index["shards"], self.starts)]
        return np.concatenate(ends) if ends else np.zeros(0, np.int64)
