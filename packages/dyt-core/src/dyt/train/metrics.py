"""Metrics to JSONL and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserInputError
from .jsonio import write_text_whole


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard. On resume, rows past the resumed step (from the interrupted run) are dropped so
    the file holds one continuous curve."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text_whole(self.path, "")
        elif self.path.exists():
            kept = [row for row in _rows(self.path, partial_last=True) if row.get("step", 0) <= resume_step]
            text = "".join(json.dumps(row) + "\n" for row in kept)
            if text != self.path.read_text():  # renamed into place: a kill here keeps the rows before the checkpoint
                write_text_whole(self.path, text)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(out_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path, partial_last: bool = False) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``; ``partial_last``: of a run that may have been killed while
    logging (see :func:`_rows`)."""
    return _rows(Path(path), partial_last=partial_last)


def _rows(path: Path, partial_last: bool) -> list[dict]:
    """The rows of a ``metrics.jsonl``. With ``partial_last``, a last line cut off mid-write (a run
    killed or out of disk while logging: the rows past its checkpoint are dropped on resume anyway)
    is dropped; any other line that is not a JSON object is a damaged file, named with its line."""
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if partial_last and index == len(lines) - 1:
                break
            raise UserInputError(f"{path}:{number}: not a metrics row (damaged by hand?); delete the line "
                                 "or the rows from it on, then run again")
        rows.append(row)
    return rows
