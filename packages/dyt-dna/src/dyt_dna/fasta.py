"""FASTA reading (plain or gzipped, multi-record, any case, N runs) with errors that name the file
and record."""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

from dyt.errors import UserInputError

from .tokenizer import encode


class FastaError(UserInputError):
    """A FASTA file is missing, empty, malformed or holds non-DNA characters."""

    kind = "FASTA error"


@dataclass
class Record:
    name: str
    sequence: str


def read_fasta(path: str | Path) -> list[Record]:
    """All records of ``path``; sequences upper-cased and checked against the DNA alphabet."""
    path = Path(path)
    if not path.is_file():
        raise FastaError(f"{path}: no such FASTA file")
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[Record] = []
    name, chunks = None, []
    try:
        with opener(path, "rt", encoding="ascii") as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if line.startswith(">"):
                    if name is not None:
                        records.append(_finish(path, name, chunks))
                    header = line[1:].split()
                    name, chunks = (header[0] if header else f"record{len(records) + 1}"), []
                elif line and not line.startswith(";"):
                    if name is None:
                        raise FastaError(f"{path}:{number}: sequence before the first '>' header; is this FASTA?")
                    chunks.append(line)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise FastaError(f"{path}: not a readable (gzipped) text FASTA file: {error}") from None
    if name is not None:
        records.append(_finish(path, name, chunks))
    if not records:
        raise FastaError(f"{path}: no FASTA records")
    return records


def _finish(path: Path, name: str, chunks: list[str]) -> Record:
    sequence = "".join(chunks).upper()
    if not sequence:
        raise FastaError(f"{path}: record {name!r} is empty")
    encode(sequence, where=f"{path} record {name!r}")  # raises AlphabetError naming the position
    return Record(name, sequence)
