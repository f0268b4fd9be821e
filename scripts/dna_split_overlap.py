"""How far the built-in DNA split's held-out strains are from the strains trained on.

The built-in genomes hold out one strain per species (dyt_dna.genomes.HELD_OUT). Strains of one
species share most of their sequence, so "never trained on" does not mean "unseen sequence". This
prints, per species, the fraction of k-mers sampled from the held-out strain's validation half (the
first half of each record, which pretraining validates on: dyt_dna.data.pretraining_regions) found verbatim, on either strand, in that species'
training strains, and in the other species' training strains for reference.

    python scripts/dna_split_overlap.py [--k 32] [--samples 20000] [--seed 0]

Memory: one sorted array of 8-byte k-mer codes per species' training strains (about 120 MB for the
largest); about a minute per species on the 2-core box.
"""

from __future__ import annotations

import argparse

import numpy as np

from dyt.errors import help_description
from dyt_dna.data import DnaDataConfig, Region, pretraining_regions
from dyt_dna.fasta import read_fasta
from dyt_dna.genomes import builtin_genomes

CODE = np.full(256, 255, dtype=np.uint8)
for base, value in zip(b"ACGT", range(4)):
    CODE[base] = value


def codes(sequence: str) -> np.ndarray:
    """2-bit codes of A/C/G/T; 255 for any other letter (N, IUPAC codes)."""
    return CODE[np.frombuffer(sequence.upper().encode("ascii"), dtype=np.uint8)]


def kmer_codes(bases: np.ndarray, k: int) -> np.ndarray:
    """Every k-mer of ``bases`` as a uint64 (2 bits a base), skipping k-mers that hold a non-ACGT letter."""
    if len(bases) < k:
        return np.empty(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(bases, k)
    clean = ~(windows == 255).any(axis=1)
    values = np.zeros(len(windows), dtype=np.uint64)
    for i in range(k):
        values = (values << np.uint64(2)) | windows[:, i].astype(np.uint64)
    return values[clean]


def both_strands(bases: np.ndarray, k: int) -> np.ndarray:
    reverse_complement = np.where(bases == 255, 255, 3 - bases)[::-1]
    return np.concatenate([kmer_codes(bases, k), kmer_codes(np.ascontiguousarray(reverse_complement), k)])


def region_bases(region: Region) -> list[np.ndarray]:
    """Each record's part in ``region``, cut as pretraining cuts it (its fractions of the record)."""
    sequences = (record.sequence for record in read_fasta(region.path))
    return [codes(s[int(len(s) * region.lo):int(len(s) * region.hi)]) for s in sequences]


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=32, help="k-mer length (at most 32)")
    parser.add_argument("--samples", type=int, default=20000, help="k-mers sampled per held-out strain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.k <= 32:
        parser.error("--k must be between 1 and 32")
    rng = np.random.default_rng(args.seed)
    genomes = builtin_genomes()
    training, validation = pretraining_regions(DnaDataConfig())  # the built-in split
    region_of = {region.path: region for region in (*training, *validation)}
    species = sorted({g.species for g in genomes})
    trained = {}
    for name in species:
        parts = [both_strands(b, args.k) for g in genomes if g.species == name and not g.held_out
                 for b in region_bases(region_of[g.path])]
        trained[name] = np.unique(np.concatenate(parts))
    print(f"k = {args.k}, {args.samples} k-mers sampled from each held-out strain's validation half (first half)")
    print("| species | held-out strain | training strains | in its species' training strains | "
          "in another species' (max) |")
    print("|---|---|---|---|---|")
    for name in species:
        held_out = next(g for g in genomes if g.species == name and g.held_out)
        half = np.concatenate([kmer_codes(b, args.k) for b in region_bases(region_of[held_out.path])])
        sample = half[rng.choice(len(half), size=min(args.samples, len(half)), replace=False)]
        same = np.isin(sample, trained[name]).mean()
        other = max(np.isin(sample, trained[o]).mean() for o in species if o != name)
        strains = ", ".join(g.strain for g in genomes if g.species == name and not g.held_out)
        print(f"| {name} | {held_out.strain} | {strains} | {same:.1%} | {other:.1%} |")


if __name__ == "__main__":
    main()
