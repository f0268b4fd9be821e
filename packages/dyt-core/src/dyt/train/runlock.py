"""One writer per run folder and per comparison folder.

Two launches training into one ``train.out_dir`` (two comparisons started with the same ``--out``,
a requeued job whose old processes still run) would delete each other's checkpoints in progress
(the save prunes folders without ``COMPLETE``), rewrite and interleave ``metrics.jsonl``, and mix
the report. Whoever writes a folder first takes an exclusive ``flock`` on a file in it, held until
it is done; a second writer stops with one line naming the holder. The kernel drops the lock when
its holder dies, so a killed run never leaves a stale one. Where the file system has no ``flock``
(some NFS mounts), the folder is used unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserInputError

LOCK_FILE = ".in_use"
"""The lock's file, inside the folder; it holds the holder's host, pid and start time."""

_HELD_FOR_PROCESS: dict[Path, int] = {}


class FolderInUseError(UserInputError):
    """Another process (here or on another host) is writing the folder."""

    kind = "folder in use"


def _lock_exclusive(fd: int, tries: int = 10, wait_s: float = 0.05) -> None:
    """The exclusive lock, tried a few times: a reader asking who writes the folder (:func:`holder`)
    holds a shared one for a moment, which a writer starting then must not take for another writer."""
    for _ in range(tries - 1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(wait_s)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _take(folder: Path, what: str) -> int | None:
    """An open descriptor holding the folder's lock (None where the file system cannot lock)."""
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UserInputError(f"cannot write {folder}: {error.strerror}; give a folder this user can write") from None
    try:
        _lock_exclusive(fd)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise FolderInUseError(
            f"{folder} is being written by another {what} ({holder}); wait for it to finish or stop it, "
            "or give this one another folder") from None
    except OSError as error:  # ENOLCK, EOPNOTSUPP: a file system without flock
        os.close(fd)
        print(f"warning: cannot lock {path} ({error.strerror}); nothing stops a second {what} from "
              "writing this folder at the same time", file=sys.stderr, flush=True)
        return None
    try:  # who holds it, for the next one's message; a full disk must not stop the run here
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {stamp}\n".encode(), 0)
    except OSError:
        pass
    return fd


@contextlib.contextmanager
def holding(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the ``with`` block (a FolderInUseError if another process has it, a
    UserInputError if the folder cannot be written)."""
    fd = _take(Path(folder), what)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


def hold_for_process(folder: Path, what: str) -> None:
    """Hold ``folder``'s lock until this process exits (a comparison's ``--out``). Taking it again
    in the process that holds it is a no-op (tests run several comparisons in one process)."""
    key = Path(folder).resolve()
    if key not in _HELD_FOR_PROCESS:
        fd = _take(key, what)
        if fd is not None:
            _HELD_FOR_PROCESS[key] = fd


def holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock now (its file's host, pid and start), None where no process does,
    or the folder has no lock file or cannot be locked: asked without taking it (a shared lock, given
    back at once), for a reader that must say a run is being written while it reads."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
    except OSError:
        return None
    finally:
        os.close(fd)  # releases a shared lock taken
    return None
