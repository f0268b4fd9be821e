"""Real data from Debian packages without installing them: ``apt-get download`` then ``dpkg-deb
-x`` into ``$DYT_CACHE/debian/<name>`` (no root needed), once, under a file lock. The recipes'
built-in corpora (genomes, speech, the Austen novels) come from here; nothing is fetched from model
or data hubs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

from .cache import cache_root


def _download(packages: Sequence[str], folder: str) -> None:
    """``apt-get download``; as root, after one ``apt-get update`` when the first try fails (a fresh
    container has no package lists)."""
    command = ["apt-get", "download", *packages]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"apt-get download {' '.join(packages)} failed: {done.stderr.strip()[-500:]}")


def unpack(packages: Sequence[str], name: str) -> Path:
    """Unpack ``packages`` into ``$DYT_CACHE/debian/<name>`` (once) and return that root."""
    target = cache_root() / "debian" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").is_file():
            return target
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise RuntimeError(
                f"the built-in data come from the Debian package(s) {', '.join(packages)}, and this machine has "
                "no apt-get/dpkg-deb: point the recipe at your own data instead (see its docs)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            _download(packages, tmp)
            staging = Path(tmp) / "root"
            for deb in sorted(Path(tmp).glob("*.deb")):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(staging), target)
        (target / ".complete").write_text("\n".join(packages))
    return target
