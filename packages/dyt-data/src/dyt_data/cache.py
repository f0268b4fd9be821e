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
