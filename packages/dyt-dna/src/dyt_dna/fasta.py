"""FASTA reading (plain or gzipped, multi-record, any case, N runs) with errors that name the file
and record."""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dyt.errors import UserInputError

from .tokenizer import check_alphabet


class FastaError(UserInputError):
    """A FASTA file is missing, empty, malformed or holds non-DNA characters."""

    kind = "FASTA error"


@dataclass
class Record:
    name: str
    sequence: str


def read_fasta(path: str | Path) -> list[Record]:
    """All records of ``path``; sequences upper-cased and checked against the DNA alphabet."""
    return list(iter_fasta(path))


def not_a_fasta_file(path: Path) -> str:
    """Why ``path``, which is no file, cannot be read as FASTA, in words."""
    return f"{path}: a folder, not a FASTA file" if path.is_dir() else f"{path}: no such FASTA file"


COMPRESSED = {b"BZh": "bzip2 (bunzip2 it)", b"\xfd7zXZ\x00": "xz (unxz it)", b"(\xb5/\xfd": "zstd (unzstd it)",
              b"PK\x03\x04": "a zip archive (unzip it)"}
"""Leading bytes of the compressed forms FASTA comes in that this reader does not open, and what to do."""
ASCII_SPACE = " \t\r\n\v\f"
"""What a line is stripped of (``str.strip()`` would also take Latin-1's no-break space from a sequence)."""


def iter_fasta(path: str | Path) -> Iterator[Record]:
    """The records of ``path`` one at a time, as :func:`read_fasta` gives them: a genome is never held
    whole (a human one took ~6 GB as a list), only the record being read. Errors come as the
    reading reaches them. Gzip is known by its leading bytes, whatever the file's name; a header is
    read as UTF-8 (its text never reaches the model; a byte-order mark before it is dropped), a
    sequence line as ASCII."""
    path = Path(path)
    if not path.is_file():
        raise FastaError(not_a_fasta_file(path))
    with open(path, "rb") as handle:
        head = handle.read(6)
    if kind := next((what for magic, what in COMPRESSED.items() if head.startswith(magic)), None):
        raise FastaError(f"{path}: compressed as {kind}: give it plain or gzipped")
    opener = gzip.open if head.startswith(b"\x1f\x8b") else open
    count, name, chunks = 0, None, []
    try:
        with opener(path, "rb") as binary:
            # Latin-1 maps each byte to one character, so nothing fails to decode here; newline=None reads
            # any line end (an old Mac's lone CR too) a line at a time
            for number, line in enumerate(io.TextIOWrapper(binary, encoding="latin-1", newline=None), 1):
                if number == 1:
                    line = line.removeprefix("\xef\xbb\xbf")  # a UTF-8 byte-order mark
                line = line.strip(ASCII_SPACE)
                if line.startswith(">"):
                    if name is not None:
                        count += 1
                        yield _finish(path, name, chunks)
                    header = line[1:].encode("latin-1").decode("utf-8", errors="replace").split()
                    name, chunks = (header[0] if header else f"record{count + 1}"), []
                elif line and not line.startswith(";"):
                    if name is None:
                        raise FastaError(f"{path}:{number}: sequence before the first '>' header; is this FASTA?")
                    if not line.isascii():
                        column = next(i for i, c in enumerate(line) if not c.isascii())
                        raise FastaError(f"{path}:{number}: byte {ord(line[column]):#04x} at column {column + 1} "
                                         "of a sequence line is not ASCII, so no DNA base")
                    chunks.append(line)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise FastaError(f"{path}: not a readable gzipped FASTA file: {error}") from None
    if name is not None:
        count += 1
        yield _finish(path, name, chunks)
    if not count:
        raise FastaError(f"{path}: no FASTA records")


def _finish(path: Path, name: str, chunks: list[str]) -> Record:
    sequence = "".join(chunks).upper()
    chunks.clear()  # the lines go before the record is used: one copy of it, not two
    if not sequence:
        raise FastaError(f"{path}: record {name!r} is empty")
    check_alphabet(sequence, where=f"{path} record {name!r}")  # raises AlphabetError naming the position
    return Record(name, sequence)
