"""The one cache folder every recipe shares, and the file digest its records use."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path


class CacheFolderUnusable(RuntimeError):
    """A cache folder cannot be made: a file stands at it or above it, or no permission. The recipes
    report it as their own data error (:func:`dyt_data.reported_as`): one line, not a traceback."""


def cache_root() -> Path:
    """``$DYT_CACHE`` or ``~/.cache/dyt``: every recipe's downloads and derived data. An empty
    ``DYT_CACHE`` counts as unset (it would otherwise put the cache in the current folder)."""
    return Path(os.environ.get("DYT_CACHE") or Path.home() / ".cache" / "dyt")


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def disk_full(error: BaseException | None) -> tuple[BaseException, int] | None:
    """The exception, ``error`` or one it was raised from or while handling, that says the disk is
    full or the quota spent, with that errno (ENOSPC, EDQUOT); None where none does. One with the
    errno first (it names the file), else one that says so in its text: pyarrow raises it without an
    errno, a ``datasets.map`` worker's comes back as its traceback's text, and a recipe's own error
    may quote it."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for each in chain:
        if getattr(each, "errno", None) in FULL_DISK:
            return each, each.errno
    for each in chain:
        for code in FULL_DISK:
            if os.strerror(code) in str(each):
                return each, code
    return None


def cache_folder(path: Path) -> Path:
    """``path`` made, with its parents, for a cache to write into, or :class:`CacheFolderUnusable`
    naming why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        why = ("a file stands at it or above it" if isinstance(error, FileExistsError | NotADirectoryError)
               else error.strerror or str(error))
        raise CacheFolderUnusable(f"cache folder {path} cannot be created: {why} (the cache lives in $DYT_CACHE, "
                                  "default ~/.cache/dyt, unless a recipe's data.cache_dir says otherwise)") from None
    return path


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
