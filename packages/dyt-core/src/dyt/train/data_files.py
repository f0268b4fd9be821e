"""Which files a run's data was read from, kept beside its ``config.yaml`` so that a resume, a
comparison reusing a finished run, and a stored eval can tell when those files changed since.

A path in a config says where data is, not what it was: a corpus folder edited in place, a FASTA
rewritten or a manifest's audio re-recorded keeps every setting the same. The record is the count,
total size and a digest of every file's resolved path, size and modification time (no file is
read), so adding, removing, rewriting or touching one changes it.

A recipe names its files by giving its data config a ``source_files()`` method (the files and
folders the user pointed it at; empty for built-in data, which is built deterministically). Built-in
data whose build can change (new voices, another split) also names its build, through a
``builtin_version()`` method: a run records it, and one trained on another build (or before builds
were recorded) is not resumed or reused."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .config import ConfigError

DATA_FILES = "data_files.json"


def files_signature(paths: Iterable[str | Path]) -> dict[str, Any]:
    """``{"files", "missing", "bytes", "digest"}`` of every file at or under ``paths`` (folders
    recursively); a missing path is counted apart and enters the digest."""
    entries = []
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                stat = file.stat()
            except FileNotFoundError:
                entries.append((str(file), None, None))
                continue
            entries.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
    return {"files": sum(size is not None for _, size, _ in entries),
            "missing": sum(size is None for _, size, _ in entries),
            "bytes": sum(size or 0 for _, size, _ in entries),
            "digest": hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]}


def saved_dataset_files(folder: Path) -> list[Path]:
    """The files of a ``datasets.save_to_disk`` folder, without the ``cache-*.arrow`` files that
    datasets' own transforms (``filter``, ``map``) write beside them when a run reads it."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("cache-"))


def data_files_once(config: Any) -> Callable[[], dict[str, Any] | None]:
    """:func:`data_files_of` ``config``, taken at the first call and kept: a launch checks the record
    before ``--resume`` and writes it once training starts, and every rank would otherwise list and
    stat a corpus of perhaps millions of files once for each."""
    return functools.cache(lambda: data_files_of(config))


def data_files_of(config: Any) -> dict[str, Any] | None:
    """The signature of the files ``config.data.source_files()`` names; for built-in data, of the
    build ``config.data.builtin_version()`` names; None where the recipe names neither (built-in data
    that does not change, or a config without a data section)."""
    data = getattr(config, "data", None)
    source_files = getattr(data, "source_files", None)
    paths = list(source_files()) if source_files is not None else []
    if paths:
        return files_signature(paths)
    builtin_version = getattr(data, "builtin_version", None)
    version = builtin_version() if builtin_version is not None else None
    if version is None:
        return None
    return {"builtin": version, "files": 0, "missing": 0, "bytes": 0,
            "digest": hashlib.sha256(version.encode()).hexdigest()[:16]}


def record_data_files(config: Any, run_dir: str | Path,
                      signature: Callable[[], dict[str, Any] | None] | None = None) -> None:
    """Write (or, for built-in data, remove) the run's record of its data files: ``signature()``,
    where the launch already took it (:func:`data_files_once`), else :func:`data_files_of` the config."""
    from .checkpoint import _atomic_write_bytes  # a kill mid-write must not leave a damaged record

    path = Path(run_dir) / DATA_FILES
    signature = signature() if signature is not None else data_files_of(config)
    if signature is None:
        path.unlink(missing_ok=True)
    else:
        _atomic_write_bytes(path, lambda handle: handle.write((json.dumps(signature, indent=1) + "\n").encode()))


def _size(signature: dict[str, Any] | None) -> str:
    if signature is None:
        return "the built-in data"
    if "builtin" in signature:
        return str(signature["builtin"])
    missing = signature.get("missing", 0)
    return (f"{signature['files']} files, {signature['bytes'] / 1e6:.1f} MB"
            + (f", {missing} path(s) not found from {Path.cwd()}" if missing else ""))


def check_data_unchanged(run_dir: str | Path, now: dict[str, Any] | None) -> None:
    """A ConfigError when ``run_dir`` recorded data files that differ from ``now`` (the
    :func:`data_files_of` the run's config now). Runs from before the record: nothing to compare,
    except on built-in data that names its build (they trained on an older one)."""
    path = Path(run_dir) / DATA_FILES
    if not path.is_file():
        if now is not None and "builtin" in now:
            raise ConfigError(
                f"{run_dir}: trained on the built-in data before its build was recorded, so on an older build than "
                f"this one ({now['builtin']}): its checkpoints and results belong to the old data; start a new run "
                "(another train.out_dir, or --fresh / another --out for a comparison)")
        return
    try:
        saved = json.loads(path.read_text())
        digest = saved["digest"]
        _size(saved)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path}: damaged (not the JSON record of a run's data files); start a new run "
                          "(another train.out_dir, or --fresh for a comparison)") from None
    if now is None or now["digest"] != digest:
        raise ConfigError(
            f"{run_dir}: the data files it trained on changed since (a file added, removed, rewritten or touched; "
            f"{_size(saved)} then, {_size(now)} now): "
            "its checkpoints and results belong to the old files; start a new run (another train.out_dir, "
            "or --fresh / another --out for a comparison)")
