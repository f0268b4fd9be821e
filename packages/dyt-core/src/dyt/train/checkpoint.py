"""Checkpoints that are either complete or ignored.

DeepSpeed's ``save_checkpoint`` writes model, optimizer and LR-scheduler state (and our client
state: step and data position) under ``checkpoints/<tag>/``; each rank adds its RNG state with an
atomic rename; after a barrier rank 0 writes ``COMPLETE``. Resume takes the newest tag that has
``COMPLETE``, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserInputError
from .distributed import DistInfo, barrier

MARKER = "COMPLETE"


class RunNotFoundError(UserInputError, FileNotFoundError):
    """A training run directory is missing, or holds no config.yaml or no complete checkpoint."""

    kind = "run error"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(directory: Path) -> int:
    """The step of a checkpoint directory (``step_00000042`` -> 42)."""
    return int(directory.name.removeprefix("step_"))


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def save(engine, root: Path, step: int, client_state: dict[str, Any], dist: DistInfo, keep: int) -> Path:
    """Save on every rank; returns the checkpoint directory once it is complete."""
    tag = _tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    directory = root / tag
    _atomic_write_bytes(directory / f"rng_rank{dist.rank}.pt", lambda h: torch.save(rng_state(), h))
    barrier()
    if dist.is_main:
        meta = json.dumps({"step": step, "world_size": dist.world_size}).encode()
        _atomic_write_bytes(directory / MARKER, lambda h: h.write(meta))
        done = complete_checkpoints(root)
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in (p for p in root.iterdir() if p.is_dir() and not (p / MARKER).exists()):
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted save
    barrier()
    return directory


def load(engine, directory: Path, dist: DistInfo) -> dict[str, Any]:
    """Restore engine state and this rank's RNG from a complete checkpoint; returns the client state."""
    meta = json.loads((directory / MARKER).read_text())
    _, client_state = engine.load_checkpoint(str(directory.parent), tag=directory.name)
    rng_file = directory / f"rng_rank{dist.rank}.pt"
    if meta["world_size"] == dist.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def check_run(run_dir: str | Path, weights: bool = True) -> None:
    """``run_dir`` is a training run's ``out_dir`` with its ``config.yaml`` and (with ``weights``) a
    complete checkpoint; else a RunNotFoundError saying which is missing. Evals call this first,
    before any data is built."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunNotFoundError(f"{run_dir}: no such run directory (give --run a training run's train.out_dir)")
    if not (run_dir / "config.yaml").is_file():
        raise RunNotFoundError(f"{run_dir}: no config.yaml, so not a training run directory (give --run a training "
                               "run's train.out_dir)")
    if weights and not complete_checkpoints(run_dir / "checkpoints"):
        raise RunNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/ (was the run trained?)")


def trained_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's newest complete checkpoint, whole on one process (for evals and
    analysis). ZeRO-sharded checkpoints are gathered with DeepSpeed's own fp32 consolidation."""
    done = complete_checkpoints(Path(run_dir) / "checkpoints")
    if not done:
        raise RunNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/ (was the run trained?)")
    newest = done[-1]
    if any(newest.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(newest.parent), tag=newest.name)
    return torch.load(newest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
