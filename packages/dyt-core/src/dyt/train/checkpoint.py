"""Checkpoints that are either complete or ignored.

DeepSpeed's ``save_checkpoint`` writes model, optimizer and LR-scheduler state (and our client
state: step and data position) under ``checkpoints/<tag>/``; each rank adds its RNG state with an
atomic rename; once every rank's writes succeeded (each rank's outcome gathered; one rank's failed
write stops every rank together) rank 0 writes ``COMPLETE`` (with the step and world size). Resume
takes the newest tag that has ``COMPLETE``, so a run killed mid-save resumes from the previous
checkpoint.

A ZeRO checkpoint (stage 1-3: optimizer state sharded by rank) loads only on the world size that
wrote it. On another world size, rank 0 converts it once with DeepSpeed's ``ds_to_universal`` into
``<tag>/universal`` (written as ``universal.tmp``, renamed when done) and every rank loads that with
DeepSpeed's ``checkpoint.load_universal``. A ZeRO-0 checkpoint holds whole states and loads as is.
Before any of that, :func:`check_resume` compares the run's saved ``config.yaml`` with the new config,
and its record of the data files it read with those files now.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from argparse import Namespace
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserInputError, raised_together
from . import runlock
from .config import ConfigError, SettingChanges, from_dict, load_config, resume_changes, to_dict
from .data_files import DATA_FILES, check_data_unchanged
from .distributed import DistInfo, barrier, failures_agreed
from .jsonio import partial_path, write_json, write_text_whole

MARKER = "COMPLETE"
LAUNCHES = "launches.jsonl"
"""In a run folder: one row per launch (the step it started at, its world size, its whole config),
since ``config.yaml`` holds only the latest launch's settings."""
MASTER_NAMES = "fp32_master_names"
"""Client-state key of a ZeRO-0 half-precision checkpoint: the state-dict names of each of DeepSpeed's
``fp32_groups`` (the fp32 master weights), by group and position (several for a shared parameter)."""
DIVERGED = "diverged.json"
"""In a run folder: written when the launch's training loss went NaN or infinite (the step, the
loss, the last complete checkpoint, the launch's world size and config); the trainer removes it
when a launch starts (and a comparison before it launches a run).
A comparison reports such a run as diverged instead of stopping, and does not launch it again with
the same settings: an exact resume replays the same steps."""
UNIVERSAL = "universal"
"""The sub-folder of a checkpoint that holds its universal (world-size-free) form."""


class RunNotFoundError(UserInputError, FileNotFoundError):
    """A training run directory is missing, or holds no config.yaml or no complete checkpoint."""

    kind = "run error"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def step_of(directory: Path) -> int:
    """The step a complete checkpoint holds, as its ``COMPLETE`` marker says (never read back from
    the folder's name)."""
    return _marker(directory)["step"]


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = partial_path(path)
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
        state["cuda_device"] = torch.cuda.get_rng_state()  # this rank's device: the one it draws on
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back a rank's RNG states. The CUDA one goes to this rank's device alone: a resume may see
    fewer devices per process (``--gpus-per-task=1``) than the save did, where restoring every device
    saved raised an IndexError. A state saved before (``cuda``: every visible device's) is restored
    where this process sees as many devices as the save did (numbered as then), else left as seeded."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():  # numbered as the save's devices
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def _fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` (and the folders' entries) to disk: DeepSpeed's
    checkpoint engine writes without fsync, and a marker written before the shards reach the disk
    would call a checkpoint complete that a crashed node leaves cut short."""
    for path in sorted(directory.rglob("*"), reverse=True) + [directory]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # not ours to flush: e.g. a file renamed by another rank's writer
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def unfinished_save(root: Path, step: int) -> Path | None:
    """The folder an interrupted save of ``step`` left in ``root`` (no ``COMPLETE`` marker: a run killed
    mid-save, or a failed write, resumed from the checkpoint before), which the next save of that step
    deletes first; None where there is none."""
    directory = root / _tag(step)
    return directory if directory.is_dir() and not (directory / MARKER).exists() else None


def saved_bytes(directory: Path | None) -> int:
    """Bytes a save wrote in checkpoint ``directory`` (0 for None): its files, without the universal
    copy a resume on another world size made inside it (not saved again)."""
    if directory is None:
        return 0
    return sum(f.stat().st_size for f in directory.rglob("*")
               if f.is_file() and f.relative_to(directory).parts[0] != UNIVERSAL)


class SaveFailed(Exception):
    """A save that one or more ranks could not write: ``failures`` holds each such rank and its
    error, in words, in rank order. Every rank raises it together (they agreed on it)."""

    def __init__(self, failures: list[tuple[int, str]]):
        super().__init__("; ".join(f"rank {rank}: {cause}" for rank, cause in failures))
        self.failures = failures


class _WritesKept:
    """Stands in for DeepSpeed's checkpoint engine (its ``save`` and ``makedirs``) during one save:
    the first write that fails is kept, not raised, and this rank's later writes are skipped. So a
    rank whose disk is full still makes every collective of DeepSpeed's save (its barriers, ZeRO-3's
    gather of persistent parameters) as the others do, where raising left them waiting in one (over
    several nodes until the process group's timeout); the ranks then agree on what failed."""

    def __init__(self, inner) -> None:
        self.inner, self.error = inner, None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def attempt(self, write: Callable, *args, **kwargs) -> None:
        if self.error is None:
            try:
                write(*args, **kwargs)
            except (OSError, RuntimeError) as error:  # torch.save's zip writer says a full disk as RuntimeError
                self.error = error

    def save(self, state_dict, path: str) -> None:
        self.attempt(self.inner.save, state_dict, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.attempt(self.inner.makedirs, path, exist_ok=exist_ok)


@contextlib.contextmanager
def _writes_kept(engine):
    """The engine's writes through a :class:`_WritesKept` for the ``with`` block; also rank 0's copy
    of DeepSpeed's recovery scripts, written with ``shutil.copyfile`` beside the checkpoint engine."""
    kept = _WritesKept(engine.checkpoint_engine)
    engine.checkpoint_engine = kept
    own = engine.__dict__.get("_copy_recovery_script")  # an instance's own, put back after; else the class's
    copy_scripts = engine._copy_recovery_script
    engine._copy_recovery_script = lambda path: kept.attempt(copy_scripts, path)
    try:
        yield kept
    finally:
        engine.checkpoint_engine = kept.inner
        if own is None:
            del engine._copy_recovery_script
        else:
            engine._copy_recovery_script = own


def _attempt(write: Callable[[], Any]) -> BaseException | None:
    try:
        write()
    except (OSError, RuntimeError) as error:
        return error
    return None


def _agree(error: BaseException | None) -> None:
    """Where a barrier stood: every rank learns whether any rank's writes failed, and if so all raise
    :class:`SaveFailed` together, naming the ranks and their errors (one rank raising alone left the
    others in the next collective). The failing rank's own error is chained (its traceback under
    ``DYT_DEBUG=1``)."""
    barrier()  # as before the agreement: gloo's barrier also waits out every collective still in flight
    if failures := failures_agreed(error):
        raise SaveFailed(failures) from error


def save(engine, root: Path, step: int, client_state: dict[str, Any], dist: DistInfo, keep: int) -> Path:
    """Save on every rank; returns the checkpoint directory once it is complete (its files on disk).
    A write that fails on any rank (a full disk, a quota, permissions) raises :class:`SaveFailed` on
    every rank at the next agreement, before the ``COMPLETE`` marker is written and before older
    checkpoints are deleted: the complete checkpoint before stays the one ``--resume`` takes."""
    tag = _tag(step)
    directory = root / tag
    error = None
    if dist.is_main and (left := unfinished_save(root, step)):
        # DeepSpeed would write into it and keep the old world's extra shards beside the new ones
        error = _attempt(lambda: shutil.rmtree(left))
    _agree(error)
    with _writes_kept(engine) as kept:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    error = kept.error or _attempt(lambda: _atomic_write_bytes(directory / f"rng_rank{dist.rank}.pt",
                                                               lambda h: torch.save(rng_state(), h)))
    _agree(error)  # every rank's files written
    # one process a node: a node's page cache holds what all its ranks wrote
    _agree(_attempt(lambda: _fsync_tree(directory)) if dist.local_rank == 0 else None)
    error = None
    if dist.is_main:
        meta = json.dumps({"step": step, "world_size": dist.world_size}).encode()
        error = _attempt(lambda: _atomic_write_bytes(directory / MARKER, lambda h: h.write(meta)))
    if dist.is_main and error is None:
        with contextlib.suppress(OSError):  # saved all the same; the next save prunes again
            done = complete_checkpoints(root)
            for old in done[: max(0, len(done) - keep)]:
                shutil.rmtree(old, ignore_errors=True)
            for partial in (p for p in root.iterdir() if p.is_dir() and not (p / MARKER).exists()):
                shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted save
    _agree(error)
    return directory


class CheckpointLoadError(UserInputError):
    """A complete checkpoint whose files do not load into this run's engine."""

    kind = "checkpoint error"
    every_rank = False  # a rank's own ZeRO shard may be the damaged file


class CheckpointMarkerError(UserInputError):
    """A checkpoint's ``COMPLETE`` marker does not hold what the harness writes there (edited or
    damaged by hand: the harness writes it atomically)."""

    kind = "checkpoint error"


def _marker(directory: Path) -> dict[str, int]:
    """A complete checkpoint's marker: ``{"step", "world_size"}`` as the save wrote them."""
    marker = directory / MARKER
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        meta = None
    counts = [meta.get(key) if isinstance(meta, dict) else None for key in ("step", "world_size")]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts) or counts[0] < 0 or counts[1] < 1:
        raise CheckpointMarkerError(f"{marker}: not a checkpoint marker (JSON with the step and world_size, "
                                    f"written last by the save); delete {directory} to resume from the "
                                    "checkpoint before it")
    return meta


def saved_world_size(directory: Path) -> int:
    """The number of ranks that wrote a complete checkpoint."""
    return _marker(directory)["world_size"]


def _zero_sharded(directory: Path) -> bool:
    return any(directory.glob("*zero_pp_rank_*optim_states.pt"))


def needs_universal(directory: Path, dist: DistInfo) -> bool:
    """The checkpoint is ZeRO-sharded by another world size than this one."""
    return saved_world_size(directory) != dist.world_size and _zero_sharded(directory)


class UniversalConversionError(UserInputError):
    """Rank 0 could not convert a ZeRO checkpoint to its universal form (a full disk, a damaged
    shard): every rank stops with it, rank 0 saying why."""

    kind = "checkpoint error"


class UniversalConversionLostError(UniversalConversionError):
    """Rank 0 wrote neither the universal checkpoint nor a failure in time (killed outright): each
    waiting rank says so, as no rank 0 is left to."""

    every_rank = False


def convert_to_universal(directory: Path, dist: DistInfo) -> Path:
    """``<directory>/universal``: DeepSpeed's universal form of a ZeRO checkpoint, converted once by
    rank 0 (``ds_to_universal``: fp32 weights and optimizer moments per parameter, whole) and reused
    by later resumes. Every rank calls this; it returns once the conversion is complete. The other
    ranks wait for its marker on the file system, not in a collective: a 7B checkpoint converts for
    longer than a process group's timeout (10 min by default) would let a barrier wait."""
    target, partial, failed = directory / UNIVERSAL, directory / f"{UNIVERSAL}.tmp", directory / f"{UNIVERSAL}.failed"
    if dist.is_main:
        failed.unlink(missing_ok=True)  # a failure of an earlier launch
    barrier()
    if dist.is_main and not (target / MARKER).is_file():
        log = io.StringIO()
        try:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            # one worker each: an extract worker holds a rank's whole ZeRO optimizer shard in memory
            args = Namespace(input_folder=str(directory), output_folder=str(partial), num_extract_workers=1,
                             num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal(args)
            (directory / "latest_universal").unlink(missing_ok=True)  # its pointer; we pass the tag
            _fsync_tree(partial)  # on disk before it is marked, as a save's files are
            _atomic_write_bytes(partial / MARKER,
                                lambda h: h.write(json.dumps({"from_world_size": saved_world_size(directory)}).encode()))
            os.replace(partial, target)
            print(f"converted {directory} to a universal checkpoint in {target}", flush=True)
        except BaseException as error:  # the other ranks wait for the marker: tell them, then raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
            print(log.getvalue()[-3000:], flush=True)
            if isinstance(error, Exception):  # the half-written copy first: it frees the space the next write needs
                shutil.rmtree(partial, ignore_errors=True)
            # last before raising: the ranks that read it stop within seconds, and the launcher then stops this one
            with contextlib.suppress(OSError):
                _atomic_write_bytes(failed, lambda h: h.write(reason.encode()))
            if not isinstance(error, Exception):
                raise  # a Ctrl-C, a SystemExit: as they came
            raise UniversalConversionError(
                f"could not convert {directory} to a universal checkpoint for {dist.world_size} rank(s) "
                f"({reason}; the converter's output is above): it writes the fp32 weights and both Adam moments "
                "whole, ~12 bytes a parameter and more while it runs, beside the checkpoint; free disk space there "
                f"and resume again, or resume on {saved_world_size(directory)} rank(s), which loads the checkpoint "
                "as saved") from error
    elif not dist.is_main:
        wait_for_conversion(target / MARKER, failed)
    barrier()
    return target


CONVERSION_WAIT_S = 6 * 3600.0
"""How long ranks 1 and up wait for rank 0's universal conversion before giving up (a rank 0 killed
outright writes no failure file): hours, as a 70B checkpoint's conversion takes."""


def wait_for_conversion(marker: Path, failed: Path, poll_s: float = 2.0, say_every_s: float = 300.0,
                        give_up_s: float = CONVERSION_WAIT_S) -> None:
    """Wait (rank 1 and up) until rank 0's conversion writes ``marker``; a UniversalConversionError as
    soon as it writes ``failed`` instead, or (UniversalConversionLostError) after ``give_up_s``. Says
    every ``say_every_s`` that it is still waiting."""
    started = last_said = time.monotonic()
    while not marker.is_file():
        if failed.is_file():
            raise UniversalConversionError(f"rank 0 could not convert {marker.parent.parent} to a universal "
                                           f"checkpoint: {failed.read_text()} (see its log)")
        if time.monotonic() - started > give_up_s:
            raise UniversalConversionLostError(
                f"rank 0 did not convert {marker.parent.parent} to a universal checkpoint in {give_up_s:.0f} s "
                "(killed? see its log); resume again: rank 0 converts it anew")
        time.sleep(poll_s)
        if time.monotonic() - last_said >= say_every_s:
            last_said = time.monotonic()
            print(f"waiting for rank 0's universal checkpoint ({last_said - started:.0f} s)", flush=True)


LOAD_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError, AssertionError)
"""What loading a damaged or mismatched checkpoint raises: torch.load's errors on a cut or damaged file,
``load_state_dict``'s on other shapes or names, and DeepSpeed's own asserts on what it finds."""


def error_gist(error: BaseException, limit: int = 300) -> str:
    """An exception in one line of at most ``limit`` characters: its first line, with the next where the
    first only introduces a list (``load_state_dict``'s "Error(s) in loading state_dict for Llama:",
    whose next line may list every key); its type where it says nothing, and before an assert's text
    (DeepSpeed's checks of what it finds are asserts, and so is a bug's)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    gist = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if isinstance(error, AssertionError):
        gist = f"AssertionError: {gist}"
    return gist if len(gist) <= limit else gist[: limit - 3] + "..."


def _missing_model_states(directory: Path) -> RunNotFoundError | None:
    """The error for a complete checkpoint without DeepSpeed's model states (``mp_rank_00_`` /
    ``zero_pp_rank_N_mp_rank_00_`` files: a run copied in part), or None."""
    if any(directory.glob("*model_states.pt")):
        return None
    return RunNotFoundError(f"{directory}: marked complete but holds no model states (*model_states.pt): a run copied "
                            "in part? Copy the whole checkpoint folder, or delete it to use the one before")


SHARD_NAME = re.compile(r"(.*zero_pp_rank_)(\d+)(_mp_rank_)(\d+)(_(?:model|optim)_states\.pt)")
"""DeepSpeed's name of a rank's ZeRO file: ``[bf16_]zero_pp_rank_<data-parallel rank>_mp_rank_<model-parallel
rank>_{model,optim}_states.pt``."""


def _torch_file_problem(path: Path) -> Exception | None:
    """Why ``path`` is not a whole torch file, or None. ``torch.save`` writes a zip archive whose
    directory is at its end, so one cut short does not open as one; a file in torch's legacy format
    (a pickle: DeepSpeed's ``checkpoint_serialization: false``) cannot be checked without loading it."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head[:1] == b"\x80":  # the legacy format's pickle protocol byte; a zip starts "PK\x03\x04"
            return None
        with zipfile.ZipFile(path):
            return None
    except Exception as error:  # BadZipFile, OSError, and what a damaged directory makes zipfile raise
        return error


def _damaged_file(directory: Path, files: list[Path], dist: DistInfo) -> tuple[Exception, str] | None:
    """This rank's share of ``files`` (each checked by one rank) that is cut short or not a torch file
    (:func:`_torch_file_problem`), or, of the ZeRO files among them, a rank's missing (rank 0 looks):
    the error and its words (the file's path in ``directory`` first), or None."""
    for path in files[dist.rank :: dist.world_size]:
        if (problem := _torch_file_problem(path)) is not None:
            return problem, f"{path.relative_to(directory)}: {error_gist(problem)}"
    if dist.is_main:
        ranks: dict[tuple[str, str, str], set[int]] = {}  # a name with its ranks left out -> the data-parallel ranks
        for path in files:
            if found := SHARD_NAME.fullmatch(path.name):
                ranks.setdefault((found[1], found[3] + found[4], found[5]), set()).add(int(found[2]))
        model_parallel = len({middle for _, middle, _ in ranks}) or 1  # AutoTP: the ranks split over these
        saved = saved_world_size(directory) // model_parallel
        for (head, middle, tail), present in sorted(ranks.items()):
            if absent := sorted(set(range(saved)) - present):
                error = FileNotFoundError(f"{head}{absent[0]}{middle}{tail}")
                others = f", and {len(absent) - 1} more of the {saved} ranks' files like it" if len(absent) > 1 else ""
                return error, f"{error} is missing{others}"
    return None


def _check_files_together(directory: Path, files: list[Path], dist: DistInfo, advice: Callable[[str], str]) -> None:
    """Every rank checks its share of ``files`` (:func:`_damaged_file`), and all stop together on a
    problem any rank found: a :class:`CheckpointLoadError` whose message ``advice`` makes from the
    first problem's words, printed by rank 0."""
    damaged = _damaged_file(directory, files, dist)
    if failures := failures_agreed(*damaged if damaged else (None, None)):
        said = failures[0][1] + (f"; {len(failures) - 1} more found by other ranks" if len(failures) > 1 else "")
        error = CheckpointLoadError(advice(said))
        error.every_rank = True  # every rank raises it here; rank 0 says it
        raise raised_together(error) from damaged[0] if damaged else None


def load(engine, directory: Path, dist: DistInfo, universal: bool = False) -> dict[str, Any]:
    """Restore engine state and, on the same world size, this rank's RNG from a complete checkpoint
    (``universal``: from its universal form, for an engine built with ``load_universal``); returns
    the client state. Every rank first checks its share of the files, and all stop together on a
    damaged or missing one: DeepSpeed's load is collective, so a rank whose own shard failed to load
    stopped alone, and the others waited in the load's next collective (on gloo, rank 0 reported
    the lost peer as its own load failure)."""
    loading = directory / UNIVERSAL if universal else directory
    if missing := _missing_model_states(directory):
        raise missing
    _check_files_together(directory, sorted(directory.glob("*.pt")), dist, lambda said: (
        f"{directory} is marked complete but a file in it is damaged or missing ({said}): delete that folder to "
        "resume from the one before"))
    if universal:  # a copy made for this world size: made again when deleted, the checkpoint kept
        _check_files_together(directory, sorted((directory / UNIVERSAL).rglob("*.pt")), dist, lambda said: (
            f"{directory / UNIVERSAL}, the universal form of {directory} for this world size, holds a damaged or "
            f"missing file ({said}): delete that folder (not the checkpoint) for the next resume to convert it again"))
    try:
        if universal:
            _, client_state = engine.load_checkpoint(str(directory), tag=UNIVERSAL)
            loading = directory  # the buffers come from the checkpoint as saved
            _load_buffers(engine.module, directory)
        else:
            _, client_state = engine.load_checkpoint(str(directory.parent), tag=directory.name)
    except (torch.OutOfMemoryError, torch.distributed.DistBackendError):
        raise  # not the checkpoint's fault
    except LOAD_ERRORS as error:
        first = error_gist(error)
        if loading != directory:  # the checkpoint as saved may be sound: its universal copy is what can be made again
            raise CheckpointLoadError(
                f"{loading}, the universal form of {directory} for this world size, does not load "
                f"({first}): delete that folder (not the checkpoint) for the next resume to convert it again; if "
                "the model or this code changed since, start a new run in another train.out_dir") from error
        raise CheckpointLoadError(
            f"{directory} is marked complete but does not load ({first}): if a file in it was damaged since the "
            "save, delete that folder to resume from the one before; if the model or this code changed since (e.g. "
            "its parameter groups), start a new run in another train.out_dir") from error
    rng_file = directory / f"rng_rank{dist.rank}.pt"
    if saved_world_size(directory) == dist.world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def _load_buffers(module: torch.nn.Module, directory: Path) -> None:
    """The module's persistent buffers from a checkpoint's model-states file. DeepSpeed's universal
    load restores parameters and optimizer states only (``engine.py`` skips the module state dict),
    so buffers came back as built: sigmaReparam's power-iteration vector ``u``, for one, restarted
    from the initial weights' SVD. Buffers are whole on every rank under every ZeRO stage."""
    files = sorted(directory.glob("*model_states.pt"))
    if not files:
        raise OSError(f"no model states file in {directory}")
    saved = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)["module"]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                if saved[name].shape != buffer.shape:
                    raise ValueError(f"buffer {name} was saved with shape {tuple(saved[name].shape)}, "
                                     f"the model's is {tuple(buffer.shape)}")
                buffer.copy_(saved[name])


def settings_changes(config: Any) -> SettingChanges | None:
    """How ``config`` differs from the saved ``config.yaml`` of the run in its
    ``train.out_dir`` (:func:`~dyt.train.config.resume_changes`); None when the run has no complete
    checkpoint yet (it starts fresh, nothing is fixed). A damaged marker, or a saved config that is
    missing or does not load as this recipe's, is a ConfigError (the settings the checkpoints were made
    with cannot be checked: a model changed since would fail to load them, or train on quietly)."""
    run_dir = Path(config.train.out_dir)
    saved_file = run_dir / "config.yaml"
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        return None
    if not saved_file.is_file():
        raise ConfigError(f"{saved_file} is missing beside the run's checkpoints, so the settings they were made with "
                          f"cannot be checked (each launch's are in {run_dir / LAUNCHES} where the run has one, since "
                          "2026-12-05: put the last one's config back as config.yaml)")
    saved_world_size(checkpoints[-1])  # a damaged marker stops here, before any data is built
    try:
        saved = load_config(type(config), saved_file, check_files=False)
    except ConfigError as error:
        raise ConfigError(f"the run's saved config does not load as this recipe's ({error})") from None
    return resume_changes(saved, config)


def record_launch(run_dir: Path, step: int, world_size: int, config: Any) -> None:
    """Append this launch to the run's :data:`LAUNCHES` (a fresh run, ``step`` 0, starts the file anew)."""
    row = json.dumps({"step": step, "world_size": world_size, "config": to_dict(config)}) + "\n"
    path = run_dir / LAUNCHES
    if step == 0 or not path.is_file():
        write_text_whole(path, row)
    else:
        text = path.read_text()
        if text and not text.endswith("\n"):  # a launch killed while recording itself: its line goes
            write_text_whole(path, text[: text.rfind("\n") + 1] + row)
        else:
            with open(path, "a") as handle:
                handle.write(row)
    (run_dir / DIVERGED).unlink(missing_ok=True)  # this launch's outcome is not known yet


def record_divergence(run_dir: Path, step: int, loss: str, last_good: Path | None, world_size: int,
                      config: Any) -> None:
    """Write :data:`DIVERGED` for a launch whose training loss became ``loss`` (``nan``, ``inf``, in
    words) at ``step``."""
    record = {"step": step, "loss": loss, "last_good": str(last_good) if last_good else None,
              "world_size": world_size, "config": to_dict(config)}
    write_json(run_dir / DIVERGED, record)


def read_divergence(run_dir: Path) -> dict | None:
    """The :data:`DIVERGED` record in ``run_dir`` (None: none there); a damaged one is a ConfigError."""
    path = Path(run_dir) / DIVERGED
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        missing = [key for key in ("step", "loss", "last_good", "world_size", "config") if key not in record]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return record
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: a divergence record this code cannot read ({error}); delete it to launch the "
                          "run again") from None


def divergence_of(config: Any, world_size: int, data_now: dict | None) -> dict | None:
    """The :data:`DIVERGED` record of the run in ``config.train.out_dir`` when it diverged with the
    settings that make its numbers (fixed ones, and ``RESUME_CHANGES_RESULTS``) and the ranks of
    ``config`` on ``world_size``, on the data files it would read now (``data_now``:
    :func:`data_files_of`): launched again, it would diverge again. None when it did not diverge, or
    did with other settings or data (a launch with these may not)."""
    record = read_divergence(Path(config.train.out_dir))
    if record is None:
        return None
    try:
        launched = from_dict(type(config), record["config"])
    except (ValueError, KeyError, TypeError) as error:  # ConfigError is a ValueError
        raise ConfigError(f"{Path(config.train.out_dir) / DIVERGED}: a divergence record this code cannot read "
                          f"({error}); delete it to launch the run again") from None
    fixed, _, results = resume_changes(launched, config)
    if fixed or results or record["world_size"] != world_size:
        return None
    saved = Path(config.train.out_dir) / DATA_FILES  # written by the launch that diverged
    if saved.is_file() and data_now is not None:
        try:
            if json.loads(saved.read_text())["digest"] != data_now["digest"]:
                return None
        except (ValueError, KeyError, TypeError):
            return None
    return record


def recorded_launches(run_dir: Path) -> list[dict] | None:
    """The run's launches as :func:`record_launch` wrote them (``step``, ``world_size``, ``config``), in
    order; None for a run without the record; a ConfigError for a line that is not JSON, but for a
    last line cut off mid-write (a launch killed while recording itself: the next launch drops it)."""
    path = Path(run_dir) / LAUNCHES
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as error:
            if not line.endswith("\n"):  # cut short, the last line
                break
            raise ConfigError(f"{path}: a launch this code cannot read ({error})") from None
    return rows


def launches_differing(config: Any, world_size: int) -> list[str] | None:
    """What any recorded launch of the run in ``config.train.out_dir`` trained with that differs from
    ``config`` on ``world_size`` ranks in a setting that makes its numbers (fixed ones, and
    ``RESUME_CHANGES_RESULTS``) or in its ranks, each ``key old -> new (launch at step N)``. A run
    resumed by hand with other batches, or extended to more steps, keeps its latest settings in
    ``config.yaml`` alone; this reads them all. None for runs from before the record (2026-12-05)."""
    path = Path(config.train.out_dir) / LAUNCHES
    rows = recorded_launches(path.parent)
    if rows is None:
        return None
    found: list[str] = []
    for row in rows:
        try:
            launched = from_dict(type(config), row["config"])
        except (ValueError, KeyError, TypeError) as error:  # ConfigError is a ValueError
            raise ConfigError(f"{path}: a launch this code cannot read ({error})") from None
        fixed, _, results = resume_changes(launched, config)
        ranks = [] if row["world_size"] == world_size else [f"ranks {row['world_size']} -> {world_size}"]
        found += [f"{change} (launch at step {row['step']})" for change in [*fixed, *results, *ranks]]
    return list(dict.fromkeys(found))


def check_fresh_start(config: Any) -> None:
    """Without ``--resume``: a ``train.out_dir`` that holds a complete checkpoint is another run's. A new
    run there would overwrite its ``config.yaml``, lose its own checkpoints to the pruning of the old
    ones (the newest are kept), and a later ``--resume`` would continue the old weights under the new
    settings: a ConfigError instead."""
    run_dir = Path(config.train.out_dir)
    done = complete_checkpoints(run_dir / "checkpoints")
    if done:
        raise ConfigError(f"{run_dir} holds a run's checkpoints (newest {done[-1]}, step {step_of(done[-1])}): "
                          "--resume continues that run; a new run needs another train.out_dir (or that folder deleted)")


def check_resume(config: Any, data_files: Callable[[], dict[str, Any] | None]) -> list[str]:
    """Before a ``--resume``: the settings that changed since the run's saved ``config.yaml`` and may
    change (to print); a ConfigError naming every changed setting that may not (the model's, and
    the train settings a checkpoint fixes: :attr:`TrainConfig.RESUME_MAY_CHANGE`), or when the files
    its data was read from changed (:mod:`dyt.train.data_files`). Nothing to check
    when the run has no complete checkpoint yet (the run starts fresh). ``data_files``: the launch's
    :func:`~dyt.train.data_files.data_files_once`, so that the files are listed once."""
    try:
        changes = settings_changes(config)
    except ConfigError as error:
        raise ConfigError(f"--resume: {error}; start a new run in another train.out_dir") from None
    if changes is None:
        return []
    fixed, allowed, _ = changes
    run_dir = Path(config.train.out_dir)
    if fixed:
        raise ConfigError(
            f"--resume: {'; '.join(fixed)} (saved in {run_dir / 'config.yaml'}): a run keeps these "
            "settings, its checkpoint was made with them; put them back, or start a new run in another train.out_dir"
        )
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    if config.train.steps < step_of(newest):
        raise ConfigError(f"--resume: train.steps {config.train.steps} is below the step of the run's newest checkpoint "
                          f"{newest} ({step_of(newest)}): nothing would train; give train.steps {step_of(newest)} or more")
    check_data_unchanged(run_dir, data_files())
    return allowed


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
    if not weights:
        return
    done = complete_checkpoints(run_dir / "checkpoints")
    if not done:
        raise RunNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/ (was the run trained?)")
    if missing := _missing_model_states(done[-1]):
        raise missing


def config_digest(run_dir: str | Path) -> str:
    """A digest of the run's ``config.yaml``: in a standalone eval's stored settings, so that a run
    trained anew in the same folder (other settings, norm or seed) is evaluated anew, while the same
    run moved elsewhere is still recognised."""
    return hashlib.sha256((Path(run_dir) / "config.yaml").read_bytes()).hexdigest()[:16]


def evaluated_checkpoint(run_dir: str | Path, steps: int) -> tuple[int, str]:
    """The step of the newest complete checkpoint of the run in ``run_dir``, which an eval reads, and a
    line saying so: with the run's ``steps`` (``train.steps``), and whether the run is unfinished,
    stopped by a divergence, or being trained now (its lock held: a newer checkpoint may come, and the
    one read may be pruned meanwhile). :func:`check_run` first."""
    run_dir = Path(run_dir)
    step = step_of(complete_checkpoints(run_dir / "checkpoints")[-1])
    line = f"{run_dir}: checkpoint step {step} of {steps}"
    writer = runlock.holder(run_dir)
    if (diverged := read_divergence(run_dir)) is not None:
        line += f" (the run diverged at step {diverged['step']}: this is its last good checkpoint)"
    elif step < steps and writer is None:
        line += " (the run is unfinished: --resume it to train on)"
    if writer is not None:
        line += f"; a training launch is writing the run now ({writer}): a newer checkpoint it saves is not evaluated"
    return step, line


_PINNED: contextvars.ContextVar[tuple[tuple[Path, int], ...]] = contextvars.ContextVar("pinned_checkpoints", default=())


@contextlib.contextmanager
def checkpoint_pinned(run_dir: str | Path, step: int) -> Iterator[None]:
    """Within the block :func:`trained_weights` reads the run's checkpoint of ``step``, not its newest:
    an eval reads the checkpoint its results name (:func:`evaluated_checkpoint`), whatever a launch
    still training the run saves meanwhile (and says so if that launch pruned it)."""
    token = _PINNED.set((*_PINNED.get(), (Path(run_dir).resolve(), step)))
    try:
        yield
    finally:
        _PINNED.reset(token)


def pin_evaluated_checkpoint(run_dir: str | Path, steps: int) -> tuple[int, contextlib.AbstractContextManager[None]]:
    """What a standalone eval does before reading a run: print which checkpoint it reads
    (:func:`evaluated_checkpoint`), and return its step and the block that keeps reading that one
    (:func:`checkpoint_pinned`)."""
    step, line = evaluated_checkpoint(run_dir, steps)
    print(line, flush=True)
    return step, checkpoint_pinned(run_dir, step)


def trained_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a run's newest complete checkpoint (the one :func:`checkpoint_pinned`
    names, inside it), whole on one process (for evals and analysis). ZeRO-sharded checkpoints are
    gathered with DeepSpeed's own fp32 consolidation; a ZeRO-0 half-precision one gives its fp32
    master weights where the harness recorded their names (checkpoints from 2026-12-06 on; older
    ones give the half-precision copies, as before)."""
    root = Path(run_dir) / "checkpoints"
    if (pinned := dict(_PINNED.get()).get(Path(run_dir).resolve())) is not None:
        newest = root / _tag(pinned)
        if not (newest / MARKER).is_file():
            raise CheckpointLoadError(f"{newest}, the checkpoint this eval reads, is gone (pruned by a launch training "
                                      "the run on?): run the eval again, or once the training stops")
    elif done := complete_checkpoints(root):
        newest = done[-1]
    else:
        raise RunNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/ (was the run trained?)")
    if missing := _missing_model_states(newest):
        raise missing
    sharded = any(newest.glob("*zero_pp_rank_*optim_states.pt"))
    if sharded:  # imported outside the try (its failures are not the files'), and only where needed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        if sharded:
            return get_fp32_state_dict_from_zero_checkpoint(str(newest.parent), tag=newest.name)
        states = torch.load(newest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    except LOAD_ERRORS as error:
        if not (newest / MARKER).exists():  # deleted while read: pruned by a launch training the run on
            raise CheckpointLoadError(f"{newest} was deleted while its weights were read (a training launch keeping "
                                      "only its newest checkpoints?): run again, or once the training stops") from error
        raise CheckpointLoadError(f"{newest} is marked complete but its weights do not load ({error_gist(error)}): if a "
                                  "file in it was damaged since the save, delete that folder to use the one before") from error
    weights = states["module"]
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if states.get(MASTER_NAMES) and masters:  # ZeRO-0 in half precision: the fp32 masters, not the copies
        for names, group in zip(states[MASTER_NAMES], masters, strict=True):
            for aliases, master in zip(names, group, strict=True):
                for name in aliases:  # a shared parameter under each of its names
                    weights[name] = master.reshape(weights[name].shape)
    return weights


def load_run_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], run_dir: str | Path) -> None:
    """``model.load_state_dict(weights)``; a CheckpointLoadError where they do not fit, which means the
    run's ``config.yaml`` no longer describes the model its checkpoint holds."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointLoadError(f"{run_dir}: the newest checkpoint's weights do not fit the model its config.yaml "
                                  f"builds ({error_gist(error)}): was config.yaml edited since training? Put the "
                                  "trained settings back") from error


def run_model_builder(run_dir: str | Path, build: Callable[[], torch.nn.Module],
                      pretrained: bool = True) -> Callable[[], torch.nn.Module]:
    """A function that builds a run's model with ``build`` and loads the run's trained weights (read
    once, here), or, with ``pretrained`` False, leaves each build at its own initialisation: what
    the fine-tuning evals call once per seed."""
    weights = trained_weights(run_dir) if pretrained else None

    def make() -> torch.nn.Module:
        model = build()
        if weights is not None:
            load_run_weights(model, weights, run_dir)
        return model

    return make
