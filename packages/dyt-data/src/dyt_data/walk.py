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
    """Suffix asked for -> its files, sorted."""
    other: Counter = field(default_factory=Counter)
    """Suffix (``""`` for none) -> how many other files: not read, and said so."""
    skipped: list[str] = field(default_factory=list)
    """Folders left out, each with why: one that cannot be listed, a link to nothing."""
    again: int = 0
    """Files reached a second time (a link to a file listed already, or a file in a linked folder that
    a link listed already): each is listed once, by its own name where the walk reaches it."""

    def other_kinds(self, count: int = 4) -> str:
        """What was not read, in words, e.g. ``3 file(s) of other kinds (.md: 2, .gz: 1)``; '' for nothing."""
        said = []
        if self.other:
            kinds = ", ".join(f"{suffix or 'no suffix'}: {n}" for suffix, n in self.other.most_common(count))
            said.append(f"{sum(self.other.values())} file(s) of other kinds ({kinds}{', ...' if len(self.other) > count else ''})")
        if self.skipped:
            said.append(f"{len(self.skipped)} folder(s) that cannot be listed or link(s) to nothing: "
                        f"{'; '.join(self.skipped[:3])}{'; ...' if len(self.skipped) > 3 else ''}")
        if self.again:
            said.append(f"{self.again} file(s) reached a second time through a link (read once)")
        return " and ".join(said)


def files_by_suffix(root: Path, suffixes: Iterable[str], error: type[Exception] = OSError,
                    any_case: bool = False) -> FolderFiles:
    """Every file under ``root`` whose suffix is one of ``suffixes`` (``any_case``: in upper case too).

    One walk of the folder itself, then of each linked folder that leads out of it (each real folder
    once, so a folder reached both ways keeps the spelling without the link; a link up to a folder
    above the root, or above the folder that holds the link, adds nothing: it would bring in what lies
    beside). A file reached twice (a link to a file that is listed too) is listed once, by its own
    name where that is reached (else where found first), and counted in :attr:`FolderFiles.again`:
    read twice, a document would weigh double in training. Hidden names (a dot first: an editor's
    ``.ipynb_checkpoints`` holds older copies, macOS's ``._*`` files are not data) are skipped. A
    folder that cannot be listed (``lost+found``) or a link to nothing is left out and named in
    :attr:`FolderFiles.skipped`; a file with a wanted suffix that is a link to nothing is ``error``
    (read later, it was a traceback from deep in the reading)."""
    wanted = {(suffix.lower() if any_case else suffix): [] for suffix in suffixes}
    listed = FolderFiles(wanted)
    seen: set[tuple[int, int]] = set()
    # a file's (real folder's device and inode, name) -> (its suffix, its place in that list, found by a link)
    listed_files: dict[tuple[int, int, str], tuple[str, int, bool]] = {}
    links: list[tuple[str, str]] = []  # (link, the folder holding it)

    def walk(start: str) -> None:
        """Depth first, each folder's entries in name order; no file is stat'ed but a link (the
        entry's type comes from the listing), as ``os.walk`` lists."""
        stack = [start]
        while stack:
            folder = stack.pop()
            try:
                real = os.stat(folder)
                if (real.st_dev, real.st_ino) in seen:
                    continue
                seen.add((real.st_dev, real.st_ino))
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as problem:
                listed.skipped.append(f"{folder} (cannot be listed: {problem.strerror or problem})")
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                suffix = os.path.splitext(entry.name)[1]
                suffix = suffix.lower() if any_case else suffix
                if entry.is_symlink():
                    if _is_folder(entry):
                        links.append((entry.path, folder))
                        continue
                    target = os.path.realpath(entry.path)
                    try:
                        holder = os.stat(os.path.dirname(target))
                        identity = (holder.st_dev, holder.st_ino, os.path.basename(target))
                    except OSError:
                        identity = None
                    if identity is None or not os.path.exists(entry.path):
                        said = f"{entry.path}: a link to {_target(entry.path)}, which does not exist"
                        if suffix in wanted:
                            raise error(f"{said}: restore its target, or remove the link")
                        listed.skipped.append(said)
                        continue
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.path)
                    continue
                else:
                    identity = (real.st_dev, real.st_ino, entry.name)
                if suffix not in wanted:
                    listed.other[suffix] += 1
                elif identity in listed_files:
                    listed.again += 1
                    kind, place, by_link = listed_files[identity]
                    if by_link and not entry.is_symlink():  # the file's own spelling, not a link's
                        wanted[kind][place] = Path(entry.path)
                        listed_files[identity] = (kind, place, False)
                else:
                    listed_files[identity] = (suffix, len(wanted[suffix]), entry.is_symlink())
                    wanted[suffix].append(Path(entry.path))
            stack.extend(reversed(subfolders))  # the first in name order is walked next

    walk(str(root))  # linked folders come after, in the order found
    above = {os.path.realpath(root), os.path.abspath(root)}
    while links:
        link, holder = links.pop(0)
        try:
            target = os.stat(link)
        except OSError:
            continue  # gone since it was listed
        real = os.path.realpath(link)
        if (target.st_dev, target.st_ino) in seen:  # the root among them
            continue
        if any(_contains(real, spelled) for spelled in (*above, os.path.realpath(holder))):
            continue  # a folder above: the tree again, and whatever lies beside it
        walk(link)
    return FolderFiles({suffix: sorted(paths) for suffix, paths in wanted.items()}, listed.other, listed.skipped,
                       listed.again)


def _contains(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # through the link
    except OSError:
        return False


def _target(link: str) -> str:
    try:
        return repr(os.readlink(link))
    except OSError:  # not a link (a file removed while the folder was listed)
        return "nothing"
