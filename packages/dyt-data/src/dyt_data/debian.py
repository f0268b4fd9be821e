"""Real data from Debian packages without installing them: ``apt-get download`` then ``dpkg-deb
-x`` into ``$DYT_CACHE/debian/<name>`` (no root needed), once, under a file lock. The recipes'
built-in corpora (genomes, speech, the Austen novels) come from here; nothing is fetched from model
or data hubs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from filelock import FileLock

from .cache import CacheFolderUnusable, cache_folder, cache_root, disk_full


class BuiltinDataUnavailable(RuntimeError):
    """The Debian packages of a recipe's built-in data cannot be fetched or unpacked on this machine
    (no apt-get or dpkg-deb, no package index, no registry). The recipes report it as their own data
    error (:func:`reported_as`): one line naming the packages and what to do, not a traceback."""


@contextlib.contextmanager
def reported_as(error_type: type[Exception], folder: Path | None = None) -> Iterator[None]:
    """Re-raise :class:`BuiltinDataUnavailable`, :class:`~dyt_data.cache.CacheFolderUnusable` and a
    full disk (:func:`~dyt_data.cache.disk_full`, however wrapped) inside as ``error_type`` (a recipe's
    data error, which its commands print as one line; ``folder``: where it writes, named with its free
    space in a full disk's line): this package stays free of the kernel package's errors."""
    try:
        yield
    except (BuiltinDataUnavailable, CacheFolderUnusable) as error:
        raise error_type(str(error)) from error
    except Exception as error:
        if (found := disk_full(error)) is None:
            raise
        full, code = found
        where = getattr(full, "filename", None) or folder
        try:
            free = f", {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there" if folder is not None else ""
        except OSError:
            free = ""
        raise error_type(
            f"the disk is full, or the quota spent ({os.strerror(code)}"
            f"{f', writing in {where}' if where else ''}{free}): free space, or point the cache at a larger disk "
            "($DYT_CACHE, or the recipe's data.cache_dir), and run again") from error


def failure_reason(done: subprocess.CompletedProcess) -> str:
    """The last lines of a failed command's stderr (or its status), short enough for a one-line error."""
    return " ".join(done.stderr.strip().splitlines()[-2:])[-300:] or f"status {done.returncode}"


def _download(packages: Sequence[str], folder: str) -> None:
    """``apt-get download``; as root, after one ``apt-get update`` when the first try fails (a fresh
    container has no package lists)."""
    command = ["apt-get", "download", *packages]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode:
        raise BuiltinDataUnavailable(
            f"the built-in data need the Debian package(s) {' '.join(packages)}, and `apt-get download` failed "
            f"({failure_reason(done)}): run it where the Debian registry is reachable, or point the recipe at your own data "
            "(see its docs)"
        )


def unpack(packages: Sequence[str], name: str) -> Path:
    """Unpack ``packages`` into ``$DYT_CACHE/debian/<name>`` (once) and return that root."""
    target = cache_root() / "debian" / name
    cache_folder(target.parent)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").is_file():
            return target
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise BuiltinDataUnavailable(
                f"the built-in data come from the Debian package(s) {', '.join(packages)}, and this machine has "
                "no apt-get/dpkg-deb: point the recipe at your own data instead (see its docs)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            _download(packages, tmp)
            staging = Path(tmp) / "root"
            debs = sorted(Path(tmp).glob("*.deb"))
            for deb in debs:
                done = subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], capture_output=True, text=True)
                if done.returncode:
                    raise BuiltinDataUnavailable(f"dpkg-deb -x {deb.name} failed: {done.stderr.strip()[-300:]}")
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(staging), target)
        # the .deb files' names (package_version_arch): what was unpacked, for the caches built from it
        (target / ".complete").write_text("\n".join(deb.name for deb in debs))
    return target


def unpacked_root(name: str) -> Path | None:
    """``$DYT_CACHE/debian/<name>`` where :func:`unpack` completed it, else None (nothing fetched)."""
    target = cache_root() / "debian" / name
    return target if (target / ".complete").is_file() else None


def unpacked_versions(root: Path) -> list[str]:
    """The ``.deb`` files (``package_version_arch.deb``) :func:`unpack` unpacked into ``root``: data
    built from them keys its caches by these, so another package version builds anew (a folder
    unpacked before 2026-12-05 lists the package names alone)."""
    return (root / ".complete").read_text().split()
