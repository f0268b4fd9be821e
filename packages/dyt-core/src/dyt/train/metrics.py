"""Metrics to JSONL and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path


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
            self.path.write_text("")
        elif self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
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


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
