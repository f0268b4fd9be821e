"""The built-in DNA: 16 complete bacterial genomes of 4 species from Debian's ``ragout-examples``,
fetched with ``apt-get download`` and unpacked into ``$DYT_CACHE/debian`` (no install, no root).

One strain per species is held out of all training (pretraining and fine-tuning): its first half
is the validation region and its second half the test region — split by strain, never by window.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

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


def cache_root() -> Path:
    return Path(os.environ.get("DYT_CACHE", Path.home() / ".cache" / "dyt"))


def _fetch() -> Path:
    """Unpack the Debian package into the cache (once) and return its examples dir."""
    target = cache_root() / "debian" / PACKAGE
    examples = target / "usr/share/doc/ragout/examples"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if examples.is_dir():
            return examples
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise RuntimeError(
                f"the built-in genomes come from the Debian package {PACKAGE}, and this machine has no "
                "apt-get/dpkg-deb: pass your own FASTA files (data.fasta / data.validation_fasta)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if done.returncode or not debs:
                raise RuntimeError(f"apt-get download {PACKAGE} failed: {done.stderr.strip()[-500:]}")
            unpacked = Path(tmp) / "x"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
            shutil.move(str(unpacked), target)
    return examples


def builtin_genomes() -> list[Genome]:
    """Every reference genome, sorted by species then strain."""
    root = SYSTEM_DIR if SYSTEM_DIR.is_dir() else _fetch()
    genomes = [
        Genome(path.parent.parent.name, path.name.removesuffix(".fasta.gz"), path)
        for path in sorted(root.glob("*/references/*.fasta.gz"))
    ]
    missing = set(HELD_OUT.items()) - {(g.species, g.strain) for g in genomes}
    if missing:
        raise RuntimeError(f"{root}: expected genomes not found: {sorted(missing)}")
    return genomes


def species_names() -> list[str]:
    return sorted(HELD_OUT)
