"""The built-in DNA: 16 complete bacterial genomes of 4 species from Debian's ``ragout-examples``,
unpacked into ``$DYT_CACHE/debian`` by :func:`dyt_data.debian.unpack` (no install, no root).

One strain per species is held out of all training (pretraining and fine-tuning): its first half
is the validation region and its second half the test region — split by strain, never by window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dyt_data import reported_as, unpack

PACKAGE = "ragout-examples"
SYSTEM_DIR = Path("/usr/share/doc/ragout/examples")
HELD_OUT = {"E.Coli": "MG1655-K12", "H.Pylori": "SJM180", "S.Aureus": "USA300_FPR3757", "V.Cholerae": "O395"}


@dataclass(frozen=True)
class Genome:
    species: str
    strain: str
    path: Path

    @property
    def held_out(self) -> bool:
        return HELD_OUT.get(self.species) == self.strain


def builtin_genomes() -> list[Genome]:
    """Every reference genome, sorted by species then strain."""
    from .data import DnaDataError  # data.py imports this module

    with reported_as(DnaDataError):
        root = SYSTEM_DIR if SYSTEM_DIR.is_dir() else unpack([PACKAGE], PACKAGE) / SYSTEM_DIR.relative_to("/")
    genomes = [
        Genome(path.parent.parent.name, path.name.removesuffix(".fasta.gz"), path)
        for path in sorted(root.glob("*/references/*.fasta.gz"))
    ]
    missing = set(HELD_OUT.items()) - {(g.species, g.strain) for g in genomes}
    if missing:
        raise DnaDataError(f"{root}: the built-in genomes {sorted(missing)} are missing from {PACKAGE}; "
                           "delete the folder to unpack it again, or train on your own FASTA (--set data.fasta=...)")
    return genomes


def species_names() -> list[str]:
    return sorted(HELD_OUT)
