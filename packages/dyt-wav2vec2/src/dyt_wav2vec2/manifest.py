"""``python -m dyt_wav2vec2.manifest AUDIO_DIR OUT.tsv``: a fairseq manifest of every .wav / .flac /
.ogg / .opus / .mp3 / .aiff / .aif file under a folder (linked folders too; hidden files and folders are not
read; sample counts at 16 kHz), for ``data.train_manifest`` and friends. Files of other kinds are
counted in one line.

Every file is decoded as training will read it. A file that cannot be used (unreadable, empty,
multi-channel, truncated) is printed with its reason and left out; the manifest holds the good
files, and the command then exits with status 2, naming the files it left out."""

import argparse
import sys

from dyt.errors import CommandParser, help_description, output_file, user_errors, user_path

from .audio import SAMPLE_RATE, AudioError, manifest_from_folder

PROG = "dyt_wav2vec2.manifest"


@user_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog=PROG, description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=user_path)
    parser.add_argument("out", type=output_file)
    args = parser.parse_args(argv)
    bad: list[AudioError] = []

    def left_out(error: AudioError) -> None:
        bad.append(error)
        print(f"{PROG}: left out {error}", file=sys.stderr, flush=True)

    rows = manifest_from_folder(args.folder, args.out, on_bad=left_out,
                                on_other=lambda said: print(f"{PROG}: {args.folder}: {said}", file=sys.stderr, flush=True))
    hours = sum(r.num_samples for r in rows) / SAMPLE_RATE / 3600
    print(f"{args.out}: {len(rows)} files, {hours:.2f} h")
    if bad:
        names = ", ".join(str(e).split(": ", 1)[0] for e in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise AudioError(f"{args.out} lists {len(rows)} of {len(rows) + len(bad)} files; left out {len(bad)} bad "
                         f"file(s) (reasons above): {names}; fix or remove them and run again")


if __name__ == "__main__":
    main()
