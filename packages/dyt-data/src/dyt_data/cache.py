"""The one cache folder every recipe shares, and the file digest its records use."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """``$DYT_CACHE`` or ``~/.cache/dyt``: every recipe's downloads and derived data."""
    return Path(os.environ.get("DYT_CACHE", Path.home() / ".cache" / "dyt"))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a block at a time (constant memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_key(path: Path) -> tuple[str, int, int, int]:
    """What keys a cache built from a file: its resolved path, size, modification and change times.
    The change time moves on every write, also where a copy kept the old modification time (``cp -p``,
    ``rsync -t``, a tarball's), so such an edit rebuilds the cache; it also moves on ``chmod``, which
    costs a rebuild, not a wrong result. (A run's record of its data, ``dyt.train.data_files``, keys on
    size and modification time: a ``chmod`` must not refuse a ``--resume``.)"""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns
