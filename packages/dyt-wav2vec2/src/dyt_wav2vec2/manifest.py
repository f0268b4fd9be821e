"""``python -m dyt_wav2vec2.manifest AUDIO_DIR OUT.tsv``: a fairseq manifest of every .wav / .flac /
.ogg file under a folder (sample counts at 16 kHz), for ``data.train_manifest`` and friends."""

import argparse
from pathlib import Path

from .audio import SAMPLE_RATE, manifest_from_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dyt_wav2vec2.manifest", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    rows = manifest_from_folder(args.folder, args.out)
    hours = sum(r.num_samples for r in rows) / SAMPLE_RATE / 3600
    print(f"{args.out}: {len(rows)} files, {hours:.2f} h")


if __name__ == "__main__":
    main()
