"""The one cache folder every recipe shares."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$DYT_CACHE`` or ``~/.cache/dyt``: every recipe's downloads and derived data."""
    return Path(os.environ.get("DYT_CACHE", Path.home() / ".cache" / "dyt"))
