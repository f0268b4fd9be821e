"""The files of a data folder, as every recipe lists them."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FolderFiles:
    """What :func:`files_by_suffix` found under a folder."""

    found: dict[str, list[Path]]
    """Suffix asked for (lower case) -> its files, sorted."""
    other: Counter = field(default_factory=Counter)
    """Suffix (``""`` for none) -> how many other files: not read, and said so."""

    def other_kinds(self, count: int = 4) -> str:
        """The other files in words, e.g. ``3 files of other kinds (.md: 2, .gz: 1)``; '' for none."""
        if not self.other:
            return ""
        kinds = ", ".join(f"{suffix or 'no suffix'}: {n}" for suffix, n in self.other.most_common(count))
        more = ", ..." if len(self.other) > count else ""
        return f"{sum(self.other.values())} file(s) of other kinds ({kinds}{more})"


def files_by_suffix(root: Path, suffixes: Iterable[str], error: type[Exception] = OSError) -> FolderFiles:
    """Every file under ``root`` whose suffix (any case) is one of ``suffixes``, in one walk that
    enters linked folders (each real folder once: a link loop is walked once) and skips hidden names
    (a file or folder whose name starts with a dot: an editor's ``.ipynb_checkpoints`` holds older
    copies, macOS's ``._*`` files are not data). A link to nothing among them is ``error``, naming it
    (read later, it was a traceback from deep in the reading)."""
    wanted = {suffix.lower(): [] for suffix in suffixes}
    other: Counter = Counter()
    seen: set[tuple[int, int]] = set()

    def unreadable(problem: OSError) -> None:  # os.walk's default passes over a folder it cannot list
        raise error(f"{problem.filename}: cannot be listed ({problem.strerror or problem}): its files would be "
                    "left out; make it readable, or move it out of the folder")

    for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.stat(folder)
        if (real.st_dev, real.st_ino) in seen:  # reached again through a link
            subfolders[:] = []
            continue
        seen.add((real.st_dev, real.st_ino))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            path, suffix = Path(folder, name), os.path.splitext(name)[1].lower()
            if suffix not in wanted:
                other[suffix] += 1
            elif not os.path.exists(path):
                raise error(f"{path}: a link to {os.readlink(path)!r}, which does not exist: restore its target, "
                            "or remove the link")
            else:
                wanted[suffix].append(path)
    return FolderFiles({suffix: sorted(paths) for suffix, paths in wanted.items()}, other)
