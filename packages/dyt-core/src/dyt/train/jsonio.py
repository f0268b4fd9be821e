"""JSON (and other text) files written whole (renamed into place) and read back leniently: run records, stored
evals, reports' summaries and data surveys, which a kill must never leave half written."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any


def write_json(path: Path, value: Any, strict: bool = False) -> None:
    """``value`` as JSON at ``path``, renamed into place: a kill mid-write leaves the old file or
    none, never half of one. ``strict``: NaN and infinities as null (``json`` writes them as bare
    ``NaN`` tokens, which strict JSON readers refuse), for files people's tools read."""
    if strict:
        value = _finite_or_null(value)
    write_text_whole(path, json.dumps(value, indent=1, allow_nan=not strict))


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: named by host and process, so two
    writers (on two nodes of a shared file system) never share one."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_text_whole(path: Path, text: str) -> None:
    """``text`` at ``path``, renamed into place: a kill mid-write leaves the old file or none."""
    partial = partial_path(path)
    partial.write_text(text)
    partial.replace(path)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def read_json(path: Path) -> Any | None:
    """The JSON at ``path``; None where there is none or it does not parse (a file cut short)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
