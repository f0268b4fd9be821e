"""Character tokenizer for DNA: A, C, G, T, N plus pad and mask, with the complement map that
reverse-complement equivariance (Caduceus) and augmentation need."""

from __future__ import annotations

import numpy as np
import torch

from dyt.errors import UserInputError

SPECIALS = ("[PAD]", "[MASK]")
BASES = ("A", "C", "G", "T", "N")
VOCAB = SPECIALS + BASES
PAD, MASK = 0, 1
# IUPAC ambiguity codes name real uncertain bases (some genomes carry a few): read as N.
AMBIGUOUS = "RYSWKMBDHV"


class AlphabetError(UserInputError):
    """A sequence holds a character that is neither a base nor an IUPAC ambiguity code."""

    kind = "data error"


def _lookup() -> np.ndarray:
    table = np.full(256, -1, dtype=np.int64)
    for index, base in enumerate(BASES, start=len(SPECIALS)):
        table[ord(base)] = table[ord(base.lower())] = index
    for code in AMBIGUOUS:
        table[ord(code)] = table[ord(code.lower())] = VOCAB.index("N")
    return table


_TABLE = _lookup()
_VALID = _TABLE >= 0
COMPLEMENT = torch.tensor([VOCAB.index(c) for c in ("[PAD]", "[MASK]", "T", "G", "C", "A", "N")])


def _refuse(sequence: str, bad: np.ndarray, where: str) -> None:
    """An AlphabetError naming the first of the positions ``bad`` (not a base or an IUPAC code), if any."""
    if bad.size:
        i = int(bad[0])
        raise AlphabetError(
            f"{where}: character {sequence[i]!r} at base {i + 1} (counting from 1) is not a DNA base "
            f"(A, C, G, T, N or an IUPAC ambiguity code); {bad.size} such character(s) in all"
        )


def check_alphabet(sequence: str, where: str = "sequence") -> None:
    """:func:`encode`'s AlphabetError without its ids: two bytes a base where the ids take nine, what a
    whole chromosome is checked with. ``where`` names the source."""
    _refuse(sequence, np.flatnonzero(~_VALID[np.frombuffer(sequence.encode("latin-1", errors="replace"),
                                                            dtype=np.uint8)]), where)


def encode(sequence: str, where: str = "sequence") -> torch.Tensor:
    """Token ids of ``sequence`` (case-insensitive). ``where`` names the source in errors."""
    ids = _TABLE[np.frombuffer(sequence.encode("latin-1", errors="replace"), dtype=np.uint8)]
    _refuse(sequence, np.flatnonzero(ids < 0), where)
    return torch.from_numpy(ids)


def decode(ids: torch.Tensor) -> str:
    return "".join(VOCAB[i] if i >= len(SPECIALS) else "" for i in ids.tolist())


def reverse_complement(ids: torch.Tensor) -> torch.Tensor:
    """Reverse complement of token ids along the last dim (specials map to themselves)."""
    return COMPLEMENT.to(ids.device)[ids].flip(-1)
