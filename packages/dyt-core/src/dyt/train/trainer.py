"""The training loop every recipe shares: DeepSpeed engine, resumable data order, validation,
checkpoints, metrics, progress, and a stop on a non-finite loss.

A recipe supplies a :class:`Task` (model, datasets, loss); the harness does the rest.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import random
import shutil
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..allocator import applied, cannot_keep_freed_blocks, keep_freed_blocks
from ..analysis import AlphaTracker
from ..errors import UserInputError, raised_together
from . import checkpoint, runlock
from .config import ConfigError, TrainConfig, dump_yaml, read_json_object
from .data_files import record_data_files
from .distributed import (
    DistInfo,
    all_gather,
    all_reduce,
    any_rank,
    barrier,
    failures_agreed,
    init_distributed,
)
from .jsonio import read_json, write_json, write_text_whole
from .metrics import MetricsLogger

T = TypeVar("T")


class NonFiniteLossError(UserInputError, RuntimeError):
    """Training diverged: the loss became NaN or infinite, or the loss stayed finite while no update
    could be applied (:data:`MAX_SKIPPED_IN_A_ROW` skipped in a row, fp16's loss scale at its
    minimum) or an update left non-finite weights. The message names the step and the last good
    checkpoint. A training outcome the user's settings can change, not a bug: one line (every rank
    meets it alike, so rank 0 prints it), and the run folder's ``diverged.json`` records it."""

    kind = "diverged"
    raised_together = True  # the all-reduced loss check, or a save's agreement


class RunFolderWriteError(UserInputError):
    """Rank 0 could not write the run's records or its metrics (a full disk, a quota). Every rank
    stops on it together (they agree after each such write), and rank 0 alone says why."""

    kind = "write error"
    raised_together = True


class CheckpointSaveError(UserInputError):
    """A checkpoint could not be written (disk full, quota, permissions); the message names the step
    that was not saved, the rank that failed and the complete checkpoint a resume will start from.
    Every rank stops on it together (they agree on every rank's writes), and rank 0 alone says so."""

    kind = "checkpoint error"
    raised_together = True


class BatchReadError(UserInputError):
    """A rank could not read a batch while training or validating (a file damaged, changed or gone since
    the start-up checks, a file system's error, a bug in the task's collate). Every rank stops on it
    together (they agree after each batch read), and rank 0 says which rank failed and why; a failing
    rank's error that is neither a :class:`UserInputError` nor an OSError (a bug) is raised there as it
    was, its traceback kept (exit 1)."""

    kind = "read error"
    raised_together = True


class ForwardFailedError(UserInputError):
    """A rank's forward (the task's loss) raised, in training or validation, where the forward is not
    collective (:func:`collective_forward`: not under ZeRO-3 nor AutoTP): every rank stops on it
    together, rank 0 naming the rank and its error. A failing rank's error that is neither a
    :class:`UserInputError` nor an OSError (a GPU out of memory, a bug) is raised there as it was,
    its traceback printed (exit 1); a data error is rank 0's line alone."""

    raised_together = True


class NoRoomToSaveError(CheckpointSaveError):
    """Too little free space for the next checkpoint, found before saving (an all-reduce)."""


class Task(Protocol):
    """What a recipe provides. ``loss`` returns the loss and extra scalars; an extra named
    ``units`` (e.g. tokens in the batch) sets the unit of the throughput metric, and every other
    extra is averaged over the step and logged as ``train/<name>``, and over validation batches as
    ``eval/<name>``. Optionally,
    ``eval_metrics(eval_loss) -> dict`` adds derived validation metrics (e.g. perplexity), and
    ``data_identity() -> dict[str, str]`` names what the data was made with that its files do not
    show (LLaMA: the tokenizer's digest): recorded at a run's start, a ``--resume`` that finds it
    changed stops (:func:`check_data_identity`);
    ``train_lengths() -> Sequence[int]`` (one length per training example: the same on every rank
    and for the whole run, as it sets the data order) makes every global batch hold examples of
    like length (:func:`like_length_batches`), and
    ``partitioned_init = True`` says that ``build_model`` may run under ``deepspeed.zero.Init``: with
    ``train.zero_stage: 3`` each rank then only ever holds its shard of the weights (see
    :func:`build_partitioned`). A model whose code writes a child module's parameters after the
    child is built (a parent's ``reset_parameters``, an ``apply(init_fn)``) must do it through
    :func:`dyt.train.distributed.init_normal_` (or gather it with ``deepspeed.zero.GatheredParameters``),
    or it would write empty shards."""

    def build_model(self) -> nn.Module: ...
    def train_dataset(self) -> Dataset: ...
    def eval_dataset(self) -> Dataset | None: ...
    def collate(self, items: list[Any]) -> Any: ...
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    train_loss: float
    eval_loss: float | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(cfg: TrainConfig):
    """LR multiplier of update ``step`` (0-based): linear warmup reaching 1 at the last warmup update,
    then cosine down to min_lr / lr at the last update (``steps - 1``)."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step + 1 - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


VALIDATION_SEED = 20_251_205
"""The base of the seeds of the random draws a task makes while validating (:func:`validation_seed`)."""
MAX_SKIPPED_IN_A_ROW = 50
"""Updates DeepSpeed may skip in a row (non-finite gradients; fp16 loss-scale overflows) before the
run stops as diverged. fp16's dynamic scale from its default 2^16 reaches 1 in 17 overflows in a row
(DeepSpeed's hysteresis of 2); at ZeRO-1/2/3 the next one raises (stopped as diverged too), at
ZeRO-0 it goes on skipping at the smallest scale, which this limit stops. bf16 and fp32 skip only
on non-finite gradients. The count starts again at each launch."""


def validation_positions(size: int, count: int) -> list[int]:
    """``count`` example positions spread evenly over a validation set of ``size`` (all of it when
    ``count >= size``). Validation sets are stored in document / genome order, so their first
    examples would score one document (LLaMA's first 8k tokens were all Persuasion) or one strain."""
    count = min(size, count)
    return [i * size // count for i in range(count)]


def validation_batches(size: int, batches: int, micro_batch_size: int) -> list[list[int]]:
    """The validation's global micro-batches: ``batches`` x ``micro_batch_size`` positions
    (:func:`validation_positions`) cut in order into micro-batches, the last one possibly short.
    Batch ``b`` is scored by rank ``b % world_size``: what is scored, and how it is batched, does
    not depend on the world size."""
    positions = validation_positions(size, batches * micro_batch_size)
    return [positions[start:start + micro_batch_size] for start in range(0, len(positions), micro_batch_size)]


def idle_validation_warning(size: int, cfg: TrainConfig, world_size: int) -> str | None:
    """A warning when validation has fewer micro-batches than there are ranks (``eval_batches``
    counts them over all ranks): the others score nothing of their own."""
    scored = len(validation_batches(size, cfg.eval_batches, cfg.validation_micro_batch_size))
    if scored >= world_size:
        return None
    return (f"warning: validation scores {scored} micro-batch(es) on {world_size} ranks, so {world_size - scored} "
            "rank(s) score none (train.eval_batches counts micro-batches over all ranks; a multiple of the ranks "
            "uses every one)")


READ, COLLATE, LOSS = range(3)
"""The stages of a validation that draw random numbers, each seeded on its own (:func:`validation_seed`)."""


def validation_seed(stage: int, number: int) -> int:
    """The seed of a validation's random draws at ``stage`` for example ``number`` (``READ``) or
    global batch ``number`` (``COLLATE``, ``LOSS``): each example and each batch draws the same
    whatever rank, world size or data-loading worker scores it. Distinct for every (stage, number);
    the stride of 4 leaves a stage to spare."""
    return VALIDATION_SEED + 4 * number + stage


class _SeededBatches(Dataset):
    """The validation's global batches by number: each example read under its own seed, the batch
    collated under its own, so that a data-loading worker draws as the main process would."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any], batches: list[list[int]]):
        self.dataset, self.collate, self.batches = dataset, collate, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, number: int) -> tuple[int, Any]:
        items = []
        for position in self.batches[number]:
            seed_everything(validation_seed(READ, position))
            items.append(self.dataset[position])
        seed_everything(validation_seed(COLLATE, number))
        return number, self.collate(items)


def _on_device(numbered: tuple[int, Any], device: torch.device, float_dtype: torch.dtype | None) -> tuple[int, Any]:
    """A validation batch's number, and the batch on ``device`` (:func:`to_device`)."""
    number, batch = numbered
    return number, to_device(batch, device, float_dtype)


def _as_is(batch: Any) -> Any:
    """A DataLoader's collate for items that are whole batches already (a module function: workers pickle it)."""
    return batch


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters, for pretraining and fine-tuning alike: matrices
    decayed; not the rest (biases, norm parameters, DyT's alpha, a baseline's scalars), nor a matrix
    the model marks ``_no_weight_decay = True`` (the mamba_ssm / HyenaDNA convention: Mamba's
    ``A_log``, HyenaDNA's implicit filter). A parameter built under ZeRO-3's partitioned init is an
    empty placeholder whose real shape is ``ds_shape``."""

    def decayed(p: torch.Tensor) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2 and not getattr(p, "_no_weight_decay", False)

    decay = [p for p in model.parameters() if p.requires_grad and decayed(p)]
    rest = [p for p in model.parameters() if p.requires_grad and not decayed(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def deepspeed_config(cfg: TrainConfig, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config derived from the train settings, with cfg.deepspeed_config merged over
    (which ``TrainConfig.validate`` allows to restate a train setting only with the same value, so
    the train settings are what the engine runs); ``load_universal``: the checkpoint to resume from
    is DeepSpeed's universal form (a resume on another world size)."""
    config = cfg.derived_deepspeed_config()
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed_config: no such file {path}")
        _merge(config, read_json_object(path, "train.deepspeed_config"))
    if load_universal:
        _merge(config, {"checkpoint": {"load_universal": True}})
    return config


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move a batch (tensors in tuples, lists and dicts, at any depth) to ``device``; with
    ``float_dtype``, floating tensors (waveforms, features) also to the engine's bf16/fp16 weights'
    dtype, so a recipe's float inputs meet its half-precision layers."""
    if isinstance(batch, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and batch.is_floating_point() else batch.dtype
        return batch.to(device, dtype=dtype, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, float_dtype) for v in batch)
    return batch


HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def engine_input_dtype(engine) -> torch.dtype | None:
    """The dtype floating batch tensors are cast to: the engine's own weights' dtype when it is a
    half one (read from the engine, not from ``train.precision``), else None (inputs unchanged)."""
    model_dtype, _ = engine.get_data_types()
    return model_dtype if model_dtype in HALF_PRECISION.values() else None


GLIBC_MMAP_THRESHOLD = -3  # mallopt's M_MMAP_THRESHOLD
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # the ceiling of glibc's dynamic threshold on 64-bit


@contextmanager
def _large_frees_returned() -> Iterator[None]:
    """While a partitioned build runs, host allocations from 128 KiB up are mmapped, so each
    module's whole-size temporaries go back to the system when the module is cut to its shard.
    glibc's default raises that threshold after the first large free (up to 32 MiB), so the
    temporaries land in the heap and stay as holes between the kept shards: measured on a 302M
    LLaMA on 2 CPU ranks, +33 MB per block of 45 MB instead of the shard's 22.5. Afterwards the
    threshold is set to 32 MiB, where the dynamic one settles in a run. glibc only; elsewhere nothing."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(GLIBC_MMAP_THRESHOLD, 128 * 2**10)
    try:
        yield
    finally:
        mallopt(GLIBC_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)


def build_partitioned(build, ds_config: dict[str, Any], half_dtype: torch.dtype | None) -> nn.Module:
    """``build()`` under ``deepspeed.zero.Init``: each module's parameters become this rank's shard as
    soon as that module is built (rank 0's values, broadcast), so no rank holds the whole model and
    peak memory at init goes as 1 / world size. Built in fp32 like the whole-model path, so the same
    seed gives the same weights (and buffers such as RoPE tables stay fp32); then the shards are cast
    to the engine's half dtype, elementwise as the whole-model path casts whole parameters."""
    import deepspeed

    # fp32 through the config, not zero.Init's ``dtype``: DeepSpeed 0.19.8 reads ``dtype or fp16 if
    # the accelerator supports fp16 else bf16 ...``, so on a CPU without fp16 (mkldnn) it builds in
    # bf16 whatever dtype says (measured: an AMD EPYC box). With dtype None it takes the config's.
    fp32_config = {k: v for k, v in ds_config.items() if k not in ("bf16", "bfloat16", "fp16")}
    fp32_config.update(bf16={"enabled": False}, fp16={"enabled": False})
    with _large_frees_returned(), deepspeed.zero.Init(config_dict_or_path=fp32_config, dtype=None,
                                                      mem_efficient_linear=False):
        model = build()
    built = {p.ds_tensor.dtype for p in model.parameters() if hasattr(p, "ds_tensor")}
    if built - {torch.float32}:
        raise RuntimeError(f"deepspeed.zero.Init built the shards in {sorted(map(str, built))}, not float32")
    if half_dtype is not None:
        for param in model.parameters():
            param.ds_tensor.data = param.ds_tensor.data.to(half_dtype)
            param.data = param.data.to(half_dtype)
    return model


def global_batch_change(run_dir: Path, step: int, saved_world: int, cfg: TrainConfig, world: int) -> str | None:
    """A warning where a resume from ``step`` trains on another global batch than the launch that
    saved it did (``micro_batch_size x ranks x grad_accum``; a lost node, more GPUs): the LR schedule
    runs by step, so each step's examples change under it. The saving launch is read from the run's
    launch record (the last launch that started before ``step``; a launch since may have died before
    its first save), else its ``config.yaml``. Names the ``grad_accum`` that keeps the batch, if one
    does. ``cfg``: the settings as this launch trains them (``TrainConfig.for_world``)."""
    import yaml

    train = None
    with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):  # a damaged record: config.yaml
        for row in checkpoint.recorded_launches(run_dir) or []:
            if row["step"] < step:
                train = row["config"].get("train") or {}
    if train is None:
        try:
            train = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train") or {}
        except (OSError, yaml.YAMLError):
            return None
    micro = train.get("micro_batch_size", TrainConfig.micro_batch_size)
    accum = train.get("grad_accum", TrainConfig.grad_accum)
    if train.get("global_batch_size") is not None:  # that launch derived its grad_accum from it
        accum = train["global_batch_size"] // (micro * saved_world)
    before, now = micro * saved_world * accum, cfg.micro_batch_size * world * cfg.grad_accum
    if before == now:
        return None
    keep, left = divmod(before, cfg.micro_batch_size * world)
    if keep and not left:
        hint = (f"; --set train.global_batch_size={before} keeps it" if cfg.global_batch_size is not None else
                f"; --set train.grad_accum={keep} keeps it (train.global_batch_size: {before} keeps it on every "
                "rank count that divides it)")
    else:
        hint = "; no setting keeps it at this micro-batch size and rank count"
    return (f"warning: global batch {before} -> {now} examples per step (micro_batch_size x ranks x grad_accum: "
            f"{micro} x {saved_world} x {accum} -> {cfg.micro_batch_size} x {world} x {cfg.grad_accum}): the "
            f"schedule runs by step, so every step from here sees {now / before:.3g}x the examples{hint}")


def _zero0_gradient_norm(engine) -> float:
    """At ZeRO-0, between the last micro-batch's backward (which averaged the gradients over ranks)
    and the update: the norm of the model's gradients in fp32, fp16's loss scale divided out."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in engine.module.parameters()
             if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
    return total / (engine.optimizer.cur_scale if engine.fp16_enabled() else 1.0)


def _held_values(param: nn.Parameter) -> torch.Tensor:
    """The values of ``param`` this rank holds: the whole parameter, or under ZeRO-3 its shard's
    elements of the parameter. A shard is padded to equal size on every rank and DeepSpeed leaves the
    padding as allocated (``partition_parameters._partition_param``), so it may hold anything: a NaN
    there stopped a healthy 2-rank run as diverged now and then (a 1-element alpha, rank 1 all padding)."""
    shard = getattr(param, "ds_tensor", None)
    if shard is None:
        return param
    first = torch.distributed.get_rank(param.ds_process_group) * shard.ds_numel
    return shard.narrow(0, 0, min(max(param.ds_numel - first, 0), shard.ds_numel))


def collective_forward(engine) -> bool:
    """Whether the engine's forward runs collectives (ZeRO-3 gathers the parameters; DeepSpeed's
    AutoTP all-reduces inside the layers): a rank whose forward raised cannot then agree with the
    others, which wait inside the forward. An engine stand-in without DeepSpeed's methods: no."""
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    return stage == 3 or (getattr(engine, "autotp_size", lambda: 1)() or 1) > 1


def _forward_failed(error: Exception, collective: bool) -> Exception:
    """``error``, which this rank's forward raised, kept for the ranks' agreement; raised at once
    where the forward is collective (the other ranks wait inside it, not in an agreement). Its
    frames are cleared first: an out-of-memory error's traceback kept the forward's tensors, and
    the agreement allocates."""
    if collective:
        raise error
    traceback.clear_frames(error.__traceback__)
    return error


def _weights_finite(engine) -> bool:
    """Whether every weight is finite on every rank (each checks what it holds: ZeRO-3's shard)."""
    mine = all(bool(torch.isfinite(_held_values(p)).all()) for p in engine.module.parameters())
    return not any_rank(not mine)


def _peak_rss_per_rank() -> dict[str, float]:
    """Peak resident memory of every rank's process, in MB (Linux reports ru_maxrss in KB)."""
    import resource

    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    return {f"peak_rss_mb/rank{i}": t.item() for i, t in enumerate(all_gather(mine))}


@dataclass(frozen=True)
class DataPosition:
    """Where the training data stands: the epoch, and how many examples of its order the run has
    read over all ranks. Counted in examples, not micro-batches, so that a resume with another world
    size (or micro-batch size) starts at the example where the saved run stopped."""

    epoch: int = 0
    sample: int = 0


def check_one_step_of_data(examples: int, micro_batch_size: int, world_size: int, grad_accum: int = 1) -> None:
    """A training set must hold at least one optimizer step's examples (every rank's micro-batches
    of the step); else a UserInputError saying what to change (also asked by a comparison before it
    launches anything)."""
    if examples < micro_batch_size * world_size * grad_accum:
        step = f"{micro_batch_size} x {world_size} rank(s)" + (f" x grad_accum {grad_accum}" if grad_accum > 1 else "")
        raise UserInputError(
            f"the training set has {examples} examples: fewer than one step's batch ({step} = "
            f"{micro_batch_size * world_size * grad_accum}); lower train.micro_batch_size"
            f"{' or the batch (train.grad_accum or train.global_batch_size)' if grad_accum > 1 else ''} or give more data"
        )


DATA_IDENTITY = "data_identity.json"
"""In a run folder: the task's ``data_identity`` as the run's first launch (or its first launch
that recorded one) had it."""


def worker_error_words(error: BaseException) -> str:
    """``"Type: message"`` of ``error``; for an error a DataLoader worker raised, of the worker's own
    error. torch raises that again in the main process with the worker's whole traceback as its
    message, which put the words that matter, the error's own, past the end of a one-line report."""
    text = str(error)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return f"{type(error).__name__}: {text}"
    lines = text.rstrip().splitlines()
    last_frame = max(n for n, line in enumerate(lines) if line.startswith(" ") or "Original Traceback" in line)
    own = "\n".join(lines[last_frame + 1:])  # "module.Type: message" as a traceback names it
    named, _, message = own.partition(": ")
    if named.rsplit(".", 1)[-1] != type(error).__name__:
        return f"{type(error).__name__}: {text}"
    return f"{type(error).__name__}: {message}"


def _failure_words(error: Exception) -> str:
    """What the other ranks say of ``error``, which a rank's batch read or forward raised: its own
    words, and for an error that is neither a data nor a file system error (a bug, a GPU out of
    memory) that the rank prints its traceback."""
    try:
        words = worker_error_words(error)
    except Exception:  # these words must not fail: every other rank waits for them
        words = type(error).__name__
    if not _said_in_one_line(error):
        words += " (not a data error: that rank prints its traceback)"
    return words


def _said_in_one_line(error: Exception) -> bool:
    """A data, input or file system error (one line), not a bug or a device's failure (a traceback)."""
    return isinstance(error, (UserInputError, OSError))


def check_data_identity(run_dir: Path, now: dict[str, str] | None) -> None:
    """Before a resumed run loads its checkpoint: a ConfigError when the task's ``data_identity``
    differs from the one recorded in ``run_dir`` (LLaMA: a BPE trained again in another cache,
    ``data.cache_dir`` or ``$DYT_CACHE`` moved, that came out different, would feed the saved
    weights other token ids). Only what the record holds is compared: nothing for a run from before
    the record, nor for a name a task began to give later (the launch adds it)."""
    path = run_dir / DATA_IDENTITY
    if now is None or not path.is_file():
        return
    saved = read_json_object(path, "the run's record of its data")
    changed = [f"{name} {saved[name]} -> {value}" for name, value in now.items() if name in saved and saved[name] != value]
    if changed:
        raise ConfigError(f"--resume: the data is not what {run_dir} trained on ({'; '.join(changed)}; recorded in "
                          f"{path}): its checkpoints would read other inputs; resume with the data it was "
                          "made from, or start a new run in another train.out_dir")


def like_length_batches(order: torch.Tensor, lengths: torch.Tensor, batch_size: int,
                        generator: torch.Generator) -> list[torch.Tensor]:
    """The examples of ``order`` in batches of ``batch_size`` of like length (the last one shorter
    when ``batch_size`` does not divide them), the batches in random order: fairseq's ordering for
    speech (sorted by size, ties in ``order``'s order, batches shuffled). Used by
    ``ResumableBatches`` (a task's ``train_lengths``) and ``finetune.LengthBatches``."""
    ranked = order[torch.argsort(lengths[order], stable=True)]
    batches = ranked.split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class IndexSampler(torch.utils.data.Sampler[int]):
    """The examples of a tensor of indices, in order, as ints (a dataset's ``__getitem__`` takes ints),
    read a block at a time: no list of every index is ever made."""

    BLOCK = 1 << 16

    def __init__(self, indices: torch.Tensor):
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self.indices), self.BLOCK):
            yield from self.indices[start : start + self.BLOCK].tolist()

    def __len__(self) -> int:
        return len(self.indices)


class ResumableBatches:
    """Micro-batches in a fixed order for (seed, epoch), startable at any :class:`DataPosition`, so
    that a resumed run sees exactly the examples the uninterrupted run would have seen.

    Each epoch is one seeded permutation of the training set, cut to a multiple of the global batch
    (``micro_batch * world * grad_accum`` examples; an epoch remainder smaller than one optimizer
    step is skipped, as ``drop_last``). From position ``sample`` on, each micro-batch step takes the
    next ``micro_batch * world`` examples of that order, rank r every world-th one from r. An
    optimizer step therefore reads the same examples whatever the world size once the global batch
    is the same, across epochs too (until 2026-12-06 the cut was a multiple of ``micro_batch *
    world``, so a resume on another world size moved every step after the next epoch's start).
    A task with ``train_lengths`` gets each epoch's kept examples regrouped into global batches of
    like length (:func:`like_length_batches`)."""

    def __init__(self, dataset: Dataset, task: Task, cfg: TrainConfig, dist: DistInfo):
        self.dataset, self.task, self.cfg, self.dist = dataset, task, cfg, dist
        self.step_examples = cfg.micro_batch_size * dist.world_size
        """Examples one micro-batch takes over all ranks."""
        check_one_step_of_data(len(dataset), cfg.micro_batch_size, dist.world_size, cfg.grad_accum)
        self.global_batch = self.step_examples * cfg.grad_accum
        self.usable = len(dataset) // self.global_batch * self.global_batch
        self.lengths = None
        if hasattr(task, "train_lengths"):
            self.lengths = torch.as_tensor(task.train_lengths(), dtype=torch.int64)
            if self.lengths.shape != (len(dataset),):
                raise ValueError(f"train_lengths() gave {tuple(self.lengths.shape)} lengths for {len(dataset)} examples")
        self.per_epoch = self.usable // self.step_examples
        """Micro-batches per rank per epoch."""
        self.position = DataPosition()
        """After the last micro-batch handed out: what a checkpoint saves."""

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's order of examples, as a tensor: 4 bytes an example (8 past 2**31), where a
        list of ints took ~52 (25 GB per rank for a 2T-token corpus of 4096-token rows)."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        dtype = torch.int32 if len(self.dataset) < 2**31 else torch.int64  # the same order either way
        order = torch.randperm(len(self.dataset), generator=generator, dtype=dtype)
        if self.lengths is None:
            return order
        return torch.cat(like_length_batches(order[: self.usable], self.lengths, self.global_batch, generator))

    def iterate(self, start: DataPosition) -> Iterator[Any]:
        self.position = start
        return self._batches(start)

    def _batches(self, start: DataPosition) -> Iterator[Any]:
        epoch, sample = start.epoch, start.sample
        while True:
            if sample + self.step_examples > self.usable:
                epoch, sample = epoch + 1, 0
            steps = (self.usable - sample) // self.step_examples
            window = self._order(epoch)[sample : sample + steps * self.step_examples]
            loader = DataLoader(
                self.dataset,
                batch_size=self.cfg.micro_batch_size,
                sampler=IndexSampler(window[self.dist.rank :: self.dist.world_size]),
                drop_last=True,
                collate_fn=self.task.collate,
                num_workers=self.cfg.num_workers,
                pin_memory=self.dist.device.type == "cuda",  # the copies to the GPU run without waiting
                # Keeps the global RNG untouched; with num_workers > 0 the workers' draws (random crops)
                # depend on the run's seed and the rank, as the main process's do.
                generator=torch.Generator().manual_seed(
                    ((self.cfg.seed * 1_000_003 + epoch) * 65_537 + self.dist.rank) % 2**63),
            )
            for batch in loader:
                sample += self.step_examples
                self.position = DataPosition(epoch, sample)
                yield batch

    def position_of(self, client_state: dict[str, Any], saved_world_size: int) -> DataPosition:
        """The data position a checkpoint's client state saved. Checkpoints from before positions
        were kept in examples saved ``micro_batches`` per rank, at their world size (and, assumed
        here, this micro-batch size)."""
        if "data_position" in client_state:
            return DataPosition(**client_state["data_position"])
        step_examples = self.cfg.micro_batch_size * saved_world_size
        epoch, offset = divmod(client_state.get("micro_batches", 0), len(self.dataset) // step_examples)
        return DataPosition(epoch, offset * step_examples)


def _whole(engine, params: list[nn.Parameter]):
    """Under ZeRO-3, ``params`` gathered whole for reading (on every rank: the gather is collective);
    a parameter below ``stage3_param_persistence_threshold`` stays whole anyway, others (an alpha
    with a threshold of 0) are empty placeholders between forwards."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _zero0_half_optimizer(engine):
    """DeepSpeed's ZeRO-0 half-precision optimizer wrapper (``fp16_groups``: the model's parameters,
    ``fp32_groups``: their fp32 masters, a list beside them), else None (ZeRO-3's has no such list)."""
    optimizer = engine.optimizer
    has_lists = hasattr(optimizer, "fp16_groups") and isinstance(getattr(optimizer, "fp32_groups", None), list)
    return optimizer if has_lists else None


def _master_weight_names(engine) -> list[list[list[str]]] | None:
    """ZeRO-0 in bf16 / fp16: the state-dict names of each fp32 master weight DeepSpeed saves in the
    optimizer state (``fp32_groups``, by group and position, with no names), every name of a shared
    parameter (Caduceus' two Mamba directions share projections), so that evals read the masters, as
    ZeRO-1/2/3's consolidation does, not the half-precision copies (:func:`checkpoint.trained_weights`).
    None for other optimizers."""
    optimizer = _zero0_half_optimizer(engine)
    if optimizer is None:
        return None
    names_of: dict[int, list[str]] = {}
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return [[names_of[id(p)] for p in group] for group in optimizer.fp16_groups]


def _master_weight_reader(engine) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """In half precision, a function giving a parameter's fp32 master weight (what the optimizer
    updates; the model's bf16 copy of an alpha near 0.5 moves in steps of 2^-9, so logged curves
    were staircases); None in fp32. ZeRO-1/2/3 gather it with DeepSpeed's ``safe_get_full_fp32_param``
    (a collective: every rank logs the same rows)."""
    model_dtype, _ = engine.get_data_types()
    if model_dtype == torch.float32:
        return None
    optimizer = _zero0_half_optimizer(engine)
    if optimizer is not None:
        master_of = {id(p): m for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
                     for p, m in zip(group, masters, strict=True)}
        return lambda param: master_of.get(id(param), param)
    from deepspeed.utils import safe_get_full_fp32_param

    def gathered(param: torch.Tensor) -> torch.Tensor:
        master = safe_get_full_fp32_param(param)
        return param if master is None else master

    return gathered


@contextlib.contextmanager
def _construction_step_undone(optimizer: torch.optim.Optimizer):
    """Around ``deepspeed.initialize``: undo the step DeepSpeed's ``FP16_UnfusedOptimizer`` (ZeRO-0 in
    bf16 / fp16 with a torch optimizer) takes with zero gradients when it is built. Left, every run
    of that set-up ran one Adam step ahead (its first update ~26% smaller with betas 0.9 / 0.95 than
    under the other stages) and its matrices decayed once by ``lr x wd`` at the first warmup rate.
    Weight decay is 0 while it is built, so that step changes no weight, and its step count is set
    back to 0 (its moments are those of zero gradients: zero), leaving an optimizer that never
    stepped. The groups are the same dicts after ``initialize`` (DeepSpeed only drops empty ones)."""
    decays = {id(group): group["weight_decay"] for group in optimizer.param_groups}
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    try:
        yield
    finally:
        for group in optimizer.param_groups:
            if id(group) not in decays:
                raise RuntimeError("deepspeed.initialize replaced the optimizer's parameter groups; their "
                                   "weight decay cannot be put back")
            group["weight_decay"] = decays[id(group)]
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.item() > 0 and all(
                not torch.any(state[key]) for key in ("exp_avg", "exp_avg_sq") if key in state):
            step.zero_()


SHARED_FOLDER_WAIT_S = 30.0
"""How long a rank looks for the file rank 0 wrote in ``train.out_dir`` (a shared file system may
show a new file on other nodes a little later) before the folder counts as not shared."""


def check_folder_shared(folder: Path, dist: DistInfo, wait_s: float = SHARED_FOLDER_WAIT_S) -> None:
    """Every rank must write the same ``folder``: on a ``train.out_dir`` on each node's own disk (a
    relative path is each node's own working directory's) rank 0 marks checkpoints complete that hold
    its node's shards alone, and the run only learns so at its first ``--resume``, days later. So at
    every start rank 0 writes a random number there, and each rank must read it back."""
    if dist.world_size == 1:
        return
    token = folder / ".ranks_share_this_folder"
    number = float(random.SystemRandom().getrandbits(52)) if dist.is_main else math.inf  # "min" hands on rank 0's
    unwritable = None
    if dist.is_main:
        try:
            write_text_whole(token, f"{number:.0f}\n")
        except OSError as error:  # every rank waits below: tell them
            unwritable, number = error.strerror or str(error), -1.0
    number = all_reduce(torch.tensor([number], dtype=torch.float64), "min").item()
    if number < 0:
        raise raised_together(ConfigError(f"cannot write in train.out_dir {folder}: {unwritable or 'see rank 0'}"))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = float(token.read_text().strip() or "nan") == number
        except (OSError, ValueError):
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    blind = [rank for rank, saw in enumerate(all_gather(torch.tensor([float(seen)], dtype=torch.float64)))
             if not saw.item()]
    if dist.is_main:
        with contextlib.suppress(OSError):  # rank 0 alone: a failure here must not leave it apart from the others
            token.unlink(missing_ok=True)
    if blind:
        shown = ", ".join(map(str, blind[:8])) + (", ..." if len(blind) > 8 else "")
        raise raised_together(ConfigError(
            f"train.out_dir {folder} is not one folder for every rank: rank(s) {shown} of {dist.world_size} did not "
            f"find in {wait_s:.0f} s the file rank 0 wrote there; put it on a file system every node shares (a relative "
            "path is taken from each node's working directory), else rank 0 alone would hold complete checkpoints"))


def available_host_memory() -> int | None:
    """Bytes of host memory available now: ``MemAvailable`` in /proc/meminfo, or what this process's
    memory cgroup still allows where that is less (a batch job's share of a node); None where unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    found += _cgroup_memory_left()
    return min(found) if found else None


def _cgroup_memory_left() -> list[int]:
    """Bytes this process's memory cgroup (v2, or v1's memory controller) still allows, where it sets
    a limit; a container's own cgroup is mounted at the root, its path in /proc/self/cgroup the host's."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            files, folders = ("memory.max", "memory.current"), (root / path.lstrip("/"), root)
        elif "memory" in controllers.split(","):
            files, folders = ("memory.limit_in_bytes", "memory.usage_in_bytes"), (root / "memory" / path.lstrip("/"),
                                                                                   root / "memory")
        else:
            continue
        for folder in folders:
            try:
                limit = (folder / files[0]).read_text().strip()
                return [] if limit == "max" else [int(limit) - int((folder / files[1]).read_text())]
            except (OSError, ValueError):
                continue
    return []


def whole_build_problem(build: Callable[[], nn.Module], ranks: int, available: int | None) -> str | None:
    """Why a model built whole in fp32 on each of ``ranks`` ranks of a node (a task that cannot be
    built shard by shard, e.g. a baseline that rewrites the built model, before ZeRO-3 shards it)
    would not fit the node's ``available`` bytes of host memory; None where it fits or cannot be
    told. Counted on the meta device (no memory, no random draws); without this the build ran the
    node out of memory with no message (a 70B model: 276 GB a rank)."""
    if available is None:
        return None
    try:
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
            parameters = list(build().parameters())
    except Exception:  # code that cannot run on the meta device: built as before, unchecked
        return None
    numel = sum(p.numel() for p in parameters)
    needed = sum(p.numel() * p.element_size() for p in parameters) * ranks
    if needed <= available:
        return None
    return (f"under ZeRO-3 this model ({numel / 1e9:.2f}B parameters) is built whole in fp32 on every rank before "
            f"DeepSpeed shards it (it cannot be built shard by shard: e.g. the fixup and sigma-reparam baselines "
            f"rewrite the built model), {needed / 2**30:.1f} GiB for the {ranks} rank(s) on this node, and "
            f"{available / 2**30:.1f} GiB is available: train a smaller model or fewer ranks a node")


class Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, full_config: Any = None,
                 data_files: Callable[[], dict[str, Any] | None] | None = None):
        """``data_files``: the launch's record of its data files where it already took one
        (``dyt.train.data_files.data_files_once``); by default taken from ``full_config`` when written."""
        self.full_config = full_config if full_config is not None else cfg
        self.data_files = data_files
        self.dist = init_distributed()
        self.task, self.cfg = task, cfg.for_world(self.dist.world_size)  # grad_accum from a global batch
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"

    def build_engine(self, load_universal: bool = False):
        """The DeepSpeed engine around the task's model, optimizer and schedule. Under ZeRO-3 a task
        that declares ``partitioned_init`` is built shard by shard (:func:`build_partitioned`)."""
        import deepspeed

        config = deepspeed_config(self.cfg, load_universal)
        model = self.build_model(config)
        optimizer = torch.optim.AdamW(
            weight_decay_groups(model, self.cfg.weight_decay), lr=self.cfg.lr, betas=self.cfg.betas
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.cfg))
        with _construction_step_undone(optimizer):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=config)
        # After initialize: DeepSpeed drops empty groups in place (a model of matrices only, e.g. LLaMA
        # with norm.kind=identity, keeps one of the two).
        self.optimizer, self.weight_decays = optimizer, [group["weight_decay"] for group in optimizer.param_groups]
        seed_everything(self.cfg.seed + 7919 * (self.dist.rank + 1))  # distinct dropout per rank
        return engine

    def _repair_optimizer_after_load(self, engine) -> None:
        """Undo what DeepSpeed's checkpoint loads do to the optimizer's settings:

        - ZeRO-1/2 (``stage_1_and_2.py``, same or another world size) and bf16's optimizer put the
          saved gradient clip back over the one the engine was built with, so a ``train.grad_clip``
          changed on ``--resume`` (an allowed change) was ignored; the run's own is set again;
        - every load restores the groups' rate for the next update as the saved schedule gave it, and
          the schedule's base rate as saved; both are set from this run's ``train.lr`` and schedule
          at the saved step (``lr``, ``steps``, ``warmup_steps`` and ``min_lr`` may change on
          ``--resume``).

        And two things its ZeRO-3 universal load (``stage3.py``) does, so that a resume on another
        world size continues the run:

        - it copies the first parameter group's settings into every group, so norm weights, DyT's
          alpha and biases were decayed from then on (and every later checkpoint saved it so). The
          groups' decays are fixed by ``train.weight_decay`` (which ``--resume`` refuses to change);
        - it hands every flat fp32 partition one and the same ``step`` tensor, which AdamW advances in
          place once per partition: with two groups a step resumed at 3 went 5, 7, 9, and Adam's bias
          corrections were those of later steps. Each partition gets its own copy."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.weight_decays):
            raise RuntimeError(f"the optimizer has {len(groups)} parameter groups after the load, "
                               f"{len(self.weight_decays)} when built")
        for group, decay in zip(groups, self.weight_decays):
            group["weight_decay"] = decay
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = self.cfg.grad_clip
        # The loaded groups carry the rate the saved schedule gave the next update, the scheduler the
        # saved base rate; a resume that changed lr, steps, warmup or min_lr (allowed) would run on
        # the old ones. Every group is built at train.lr (weight_decay_groups).
        schedule = engine.lr_scheduler
        schedule.base_lrs = [self.cfg.lr] * len(groups)
        for group, base, factor in zip(groups, schedule.base_lrs, schedule.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in groups]
        seen: set[int] = set()
        for state in self.optimizer.state.values():
            adam_step = state.get("step")
            if isinstance(adam_step, torch.Tensor):
                if id(adam_step) in seen:
                    state["step"] = adam_step.clone()
                seen.add(id(adam_step))

    def build_model(self, config: dict[str, Any] | None = None) -> nn.Module:
        """The task's model as the engine gets it, from the run's seed (the same initial weights on
        every rank): under ZeRO-3, for a task that declares ``partitioned_init``, built shard by
        shard (:func:`build_partitioned`, ``config`` the DeepSpeed config); otherwise whole."""
        if self.cfg.zero_stage == 3 and getattr(self.task, "partitioned_init", False):
            seed_everything(self.cfg.seed)
            config = deepspeed_config(self.cfg) if config is None else config
            return build_partitioned(self.task.build_model, config, HALF_PRECISION.get(self.cfg.precision))
        if self.cfg.zero_stage == 3:
            barrier()  # every rank measures before any builds; then all decide on the lowest measure alike
            available = available_host_memory()
            lowest = all_reduce(torch.tensor([math.inf if available is None else float(available)],
                                             dtype=torch.float64), "min").item()
            if problem := whole_build_problem(self.task.build_model, self.dist.local_world_size,
                                              None if math.isinf(lowest) else int(lowest)):
                raise ConfigError(problem)
        seed_everything(self.cfg.seed)
        return self.task.build_model()

    def _evaluate(self, engine, dataset: Dataset) -> dict[str, float]:
        """Validation loss and the mean of every extra the task's loss reports (bar ``units``) over
        :func:`validation_batches`, weighted by examples (a short last batch counts as its size);
        ``examples``: how many scored, of ``examples_available``. Global batch ``b`` is scored on
        rank ``b % world_size`` and its draws (crops, masks) come from seeds of its examples and of
        ``b`` (:func:`validation_seed`), so a validation scores the same on any world size and any
        ``num_workers``, and a resume on another world size continues the curve. The training RNGs
        are put back afterwards: ``eval_every`` changes no trained weight."""
        state = checkpoint.rng_state()
        try:
            return self._validate(engine, dataset)
        finally:
            checkpoint.set_rng_state(state)

    def _validate(self, engine, dataset: Dataset) -> dict[str, float]:
        world = self.dist.world_size
        batches = validation_batches(len(dataset), self.cfg.eval_batches, self.cfg.validation_micro_batch_size)
        mine = list(range(self.dist.rank, len(batches), world))
        # Under ZeRO-3 a forward is collective (it gathers the parameters from all ranks): a rank with
        # fewer batches runs one again (batch 0 when it has none) as many times, uncounted.
        fillers = [mine[0] if mine else 0] * (math.ceil(len(batches) / world) - len(mine))
        loader = DataLoader(
            _SeededBatches(dataset, self.task.collate, batches),
            batch_size=None,
            sampler=mine + fillers,
            collate_fn=_as_is,
            num_workers=self.cfg.num_workers,
            pin_memory=self.dist.device.type == "cuda",
        )
        sums: dict[str, float] = {}
        extra_names: set[str] = set()
        examples = 0
        engine.eval()
        read, input_dtype = iter(loader), engine_input_dtype(engine)
        collective = collective_forward(engine)
        failed: Exception | None = None  # a forward that raised here, not collective: agreed on after the loop
        with torch.no_grad():
            for turn in range(len(mine) + len(fillers)):
                number, batch = self._read_together(  # after a failed forward, nothing read: only the agreement
                    (lambda: _on_device(next(read), self.dist.device, input_dtype)) if failed is None else lambda: (0, None),
                    f"a validation batch (turn {turn + 1} of {len(mine) + len(fillers)} on each rank)", pending=failed)
                if failed is not None:
                    continue  # the other ranks' reads still wait for this rank's agreement
                try:
                    seed_everything(validation_seed(LOSS, number))
                    loss, extras = self.task.loss(engine, batch)
                    extra_names.update(name for name in extras if name != "units")
                    if turn >= len(mine):
                        continue
                    size = len(batches[number])
                    for name, value in {"loss": loss.item(), **extras}.items():
                        if name != "units":
                            sums[name] = sums.get(name, 0.0) + float(value) * size
                    examples += size
                except Exception as error:  # a GPU out of memory, a bug, on this rank alone
                    failed = _forward_failed(error, collective)
        engine.train()
        if failures := self._failures_agreed(failed):
            self._stop_together(failed, failures, ForwardFailedError, "the forward of a validation batch failed")
        # Every rank must reduce the same names in the same order (one without a batch of its own
        # learns them from its filler's loss); ranks whose losses named other extras stop here.
        names = ["loss", *sorted(extra_names)]
        digest = zlib.crc32("\n".join(names).encode())
        most, fewest = all_reduce(torch.tensor([digest, -digest], dtype=torch.float64), "max").tolist()
        if most != -fewest:
            raise ValueError(f"the task's loss reported other extras on other ranks while validating (this rank: "
                             f"{names[1:]}): every batch must report the same names")
        count = all_reduce(torch.tensor([float(examples)], dtype=torch.float64))
        totals = all_reduce(torch.tensor([sums.get(n, 0.0) for n in names], dtype=torch.float64))
        return {**{n: (t / count).item() for n, t in zip(names, totals)},
                "examples": sum(map(len, batches)), "examples_available": len(dataset)}

    def _check_ranks_agree_on(self, done: list[Path]) -> None:
        """Every rank must resume from the same checkpoint: one that loads another step's shards, or
        starts fresh beside ranks that load (a ``train.out_dir`` on each node's own disk, where only
        rank 0's node sees the ``COMPLETE`` marker), would train on mixed weights or hang."""
        newest = float(checkpoint.step_of(done[-1])) if done else -1.0
        highest, lowest = all_reduce(torch.tensor([newest, -newest], dtype=torch.float64), "max").tolist()
        lowest = -lowest
        if highest != lowest:
            def said(step: float) -> str:
                return "none" if step < 0 else f"step {step:.0f}"
            raise raised_together(ConfigError(
                f"the ranks see different newest complete checkpoints in {self.ckpt_root} ({said(lowest)} on "
                f"some, {said(highest)} on others): train.out_dir must be on a file system every node shares"))

    def _save(self, engine, step: int, position: DataPosition) -> Path:
        """A checkpoint of ``step``; a failed write (disk full, ...) on any rank stops every rank together
        with the step it could not save, the failing rank and its error, and the complete checkpoint
        that ``--resume`` will take (the failed one never got its COMPLETE marker, and older ones are
        deleted only after a new one is complete)."""
        client = {"step": step, "data_position": {"epoch": position.epoch, "sample": position.sample}}
        if (names := _master_weight_names(engine)) is not None:
            client[checkpoint.MASTER_NAMES] = names
        self._check_room_to_save(step)
        try:
            return checkpoint.save(engine, self.ckpt_root, step, client, self.dist, self.cfg.keep_checkpoints)
        except checkpoint.SaveFailed as failed:
            rank, cause = failed.failures[0]
            if len(failed.failures) > 1:
                cause += f"; {len(failed.failures) - 1} more rank(s) failed too"
            if self.dist.world_size > 1:
                cause = f"rank {rank}: {cause}"
            try:
                cause += f"; {shutil.disk_usage(self.ckpt_root).free / 2**20:.0f} MiB free there"
            except OSError:
                pass
            raise CheckpointSaveError(f"could not save the checkpoint of step {step} in {self.ckpt_root} ({cause}); "
                                      f"{self._resume_from()}. Free disk space (or point train.out_dir elsewhere) "
                                      "and run again with --resume") from failed

    def _rank0_writes_agreed(self, write: Callable[[], T], what: str) -> T:
        """``write`` (rank 0's writes to the run folder: its records at the start, a metrics row each
        logged step), then one all-reduce so that every rank learns whether it failed. Without it, rank
        0 stopped alone on a full disk, with a traceback, and the other ranks went on into the next
        collective, on other nodes until the process group's timeout. A failed write is a
        :class:`RunFolderWriteError`; another error rank 0 met there is raised as it was."""
        failed: Exception | None = None
        try:
            result = write()
        except Exception as error:  # a damaged metrics.jsonl on --resume, a bug: the other ranks must not wait
            failed = error
        if not any_rank(failed is not None):
            return result
        if failed is not None and not isinstance(failed, OSError):
            raise raised_together(failed)  # as it was (a UserInputError names its file); the other ranks stop quietly below
        cause = f"{type(failed).__name__}: {failed}" if failed is not None else "see rank 0"  # rank 0 alone says it
        with contextlib.suppress(OSError):
            cause += f"; {shutil.disk_usage(self.out_dir).free / 2**20:.0f} MiB free there"
        raise RunFolderWriteError(f"could not {what} ({cause}); {self._resume_from()}. Free disk space (or point "
                                  "train.out_dir elsewhere) and run again with --resume") from failed

    def _failures_agreed(self, failed: Exception | None) -> list[tuple[int, str]]:
        """:func:`~dyt.train.distributed.failures_agreed` with each failure's words for the others
        (:func:`_failure_words`)."""
        return failures_agreed(failed, failed and _failure_words(failed))

    def _read_together(self, read: Callable[[], T], what: str, pending: Exception | None = None) -> T:
        """``read()`` (a batch: read, collated, on its device), then one all-reduce so that every rank
        learns whether any rank's read failed. A file damaged or gone mid-run, met by one rank, stopped
        that rank alone, and the others waited in the step's next collective: on other nodes until the
        process group's timeout (DeepSpeed's default, 10 min). The agreement comes before the forward,
        which under ZeRO-3 is collective (it gathers the parameters). ``pending``: an error this rank
        met earlier and has not agreed on yet (a validation forward), raised if another rank's read
        stops them all first."""
        failed: Exception | None = None
        try:
            batch = read()
        except Exception as error:  # a damaged file, a bug in a collate: the other ranks must not wait
            failed = error
        if not (failures := self._failures_agreed(failed)):
            return batch
        # ``pending``: this rank's own failed validation forward, not yet agreed on: its traceback too
        self._stop_together(failed or pending, failures, BatchReadError, f"could not read {what}")

    def _stop_together(self, failed: Exception | None, failures: list[tuple[int, str]],
                       error_type: type[UserInputError], what: str) -> NoReturn:
        """Stop every rank after they agreed that ``failures`` happened: a failing rank's error that
        is not said in one line (:func:`_said_in_one_line`) is raised there as it was, its traceback
        kept; every other rank raises ``error_type``, ``what`` happened, naming the (first) rank
        that failed and its words, and what ``--resume`` takes (rank 0 prints it)."""
        if failed is not None and not _said_in_one_line(failed):
            raise raised_together(failed)  # its traceback, as the other ranks stop with the line below
        rank, cause = failures[0]
        if len(failures) > 1:
            cause += f"; {len(failures) - 1} more rank(s) failed too"
        if self.dist.world_size > 1:
            cause = f"rank {rank}: {cause}"
        raise error_type(f"{what} ({cause}); {self._resume_from()}. Mend what the error names and run again with "
                         "--resume") from failed

    def _resume_from(self) -> str:
        """What ``--resume`` would start from, in words, for an error that stops the run."""
        done = checkpoint.complete_checkpoints(self.ckpt_root)
        return (f"--resume continues from step {checkpoint.step_of(done[-1])} ({done[-1]})" if done
                else "there is no complete checkpoint yet: --resume starts from step 0")

    def _check_room_to_save(self, step: int) -> None:
        """Before a save, room for one more checkpoint the size of the newest complete one (older ones
        are deleted only once the new one is complete), measured by rank 0; every rank stops on it
        together. Why: a save that fails on one rank (a full disk, the usual cause) leaves the others
        waiting inside DeepSpeed's save, on other nodes until the collective timeout. Nothing to
        measure by before a run's first checkpoint."""
        measured = [0.0, 0.0]  # free bytes, bytes needed
        if self.dist.is_main and (done := checkpoint.complete_checkpoints(self.ckpt_root)):
            with contextlib.suppress(OSError):  # unmeasurable: the save itself will say what fails
                measured = [float(shutil.disk_usage(self.ckpt_root).free + checkpoint.saved_bytes(
                                checkpoint.unfinished_save(self.ckpt_root, step))),  # deleted before saving
                            float(checkpoint.saved_bytes(done[-1]))]
        free, need = all_reduce(torch.tensor(measured, dtype=torch.float64), "max").tolist()
        if free < need:
            raise NoRoomToSaveError(
                f"no room to save the checkpoint of step {step} in {self.ckpt_root}: {free / 2**20:.1f} MiB free, "
                f"the last checkpoint took {need / 2**20:.1f} MiB; {self._resume_from()}. Free disk space (or point "
                "train.out_dir elsewhere) and run again with --resume")

    def _stop_diverged(self, step: int, loss: str, what: str, last_good: Path | None) -> NoReturn:
        """Record the divergence in the run folder (rank 0) and stop every rank: ``what`` happened at
        ``step``, with the training loss ``loss`` (in words)."""
        recorded = f"recorded in {self.out_dir / checkpoint.DIVERGED}"
        if self.dist.is_main:
            try:
                checkpoint.record_divergence(self.out_dir, step, loss, last_good, self.dist.world_size,
                                             self.full_config)
            except OSError as error:  # a full disk: the divergence is still what stops the run
                recorded = f"not recorded in {self.out_dir / checkpoint.DIVERGED}: {error.strerror or error}"
        remedy = ("a smaller train.lr (--resume --set train.lr=... continues from that checkpoint) or DyT alpha0 "
                  "(a new run) may train" if last_good else "a new run with a smaller train.lr or DyT alpha0 may train")
        raise NonFiniteLossError(
            f"{what} at step {step}; last good checkpoint: {last_good or 'none yet'} ({recorded}); the same settings "
            f"would replay the same steps: {remedy}")

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``train.steps`` (from the newest complete checkpoint with ``resume``), holding the
        run folder's lock throughout: a second launch into the same ``train.out_dir`` stops at once."""
        with contextlib.ExitStack() as held:
            refused: UserInputError | None = None
            if self.dist.is_main:
                try:
                    held.enter_context(runlock.holding(self.out_dir, "launch"))
                except UserInputError as error:  # in use, or not writable: every rank stops, rank 0 says why
                    refused = error
            if any_rank(refused is not None):
                raise raised_together(refused or runlock.FolderInUseError(f"{self.out_dir} is in use"))
            check_folder_shared(self.out_dir, self.dist)
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        if cfg.reuse_freed_memory and dist.device.type == "cpu":
            sets_it_now = cannot_keep_freed_blocks() is None  # once set, a process cannot go back to the defaults
            said = keep_freed_blocks()
            if dist.is_main:
                print(said + ("; train.reuse_freed_memory=false keeps glibc's defaults" if sets_it_now and applied() else ""),
                      flush=True)
        if (said := cfg.bf16_gradient_sum_warning()) and dist.is_main:
            print(said, flush=True)
        if cfg.global_batch_size is not None and dist.is_main:
            print(f"global batch {cfg.global_batch_size} examples per step: micro-batch {cfg.micro_batch_size} x "
                  f"{dist.world_size} rank(s) x grad_accum {cfg.grad_accum}", flush=True)
        train_set, eval_set = self.task.train_dataset(), self.task.eval_dataset()
        # Too little data is an error before the engine is built.
        batches = ResumableBatches(train_set, self.task, cfg, dist)
        if eval_set is not None and cfg.eval_every:
            if len(eval_set) == 0:
                raise UserInputError("the validation set is empty: give validation data or set train.eval_every=0")
            if dist.is_main and (said := idle_validation_warning(len(eval_set), cfg, dist.world_size)):
                print(said, flush=True)
        done = checkpoint.complete_checkpoints(self.ckpt_root) if resume else []
        self._check_ranks_agree_on(done)
        identity = self.task.data_identity() if hasattr(self.task, "data_identity") else None
        problem = None
        if done:
            try:
                check_data_identity(self.out_dir, identity)
            except ConfigError as error:
                problem = error
            except OSError as error:  # the record unreadable on this rank: every rank must still agree below
                problem = ConfigError(f"--resume: cannot read the run's record of its data in {self.out_dir} "
                                      f"({type(error).__name__}: {error})")
        # every rank stops, or none: a rank going on into the engine's collectives would wait forever;
        # rank 0 says what differs, on whichever rank (the others' lines are quiet)
        if failures := failures_agreed(problem, problem and str(problem)):  # its words on one line, as said
            rank, said = failures[0]
            raise raised_together(problem if problem is not None and dist.is_main else ConfigError(
                f"rank {rank}: {said}" if dist.world_size > 1 else said))
        if resume and not done and dist.is_main:
            print(f"nothing to resume in {self.ckpt_root}; starting fresh", flush=True)
        # A ZeRO checkpoint of another world size loads through DeepSpeed's universal form.
        universal = bool(done) and checkpoint.needs_universal(done[-1], dist)
        if universal:
            checkpoint.convert_to_universal(done[-1], dist)
        engine = self.build_engine(load_universal=universal)

        step, position, last_good = 0, DataPosition(), None
        if done:
            state = checkpoint.load(engine, done[-1], dist, universal)
            self._repair_optimizer_after_load(engine)
            saved_world = checkpoint.saved_world_size(done[-1])
            step, position, last_good = state["step"], batches.position_of(state, saved_world), done[-1]
            if dist.is_main:
                moved = (f"; saved by {saved_world} rank(s), now {dist.world_size}"
                         + (": loaded through DeepSpeed's universal checkpoint" if universal else "")
                         if saved_world != dist.world_size else "")
                print(f"resumed from {done[-1]} (step {step}, data epoch {position.epoch} example "
                      f"{position.sample}{moved})", flush=True)
                if (said := global_batch_change(self.out_dir, step, saved_world, cfg, dist.world_size)):
                    print(said, flush=True)
        def records_written() -> MetricsLogger:
            if dist.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_text_whole(self.out_dir / "config.yaml", dump_yaml(self.full_config))
                checkpoint.record_launch(self.out_dir, step, dist.world_size, self.full_config)
                record_data_files(self.full_config, self.out_dir, self.data_files)
                if identity is not None:  # the record kept (checked above), names it lacks added
                    recorded = (read_json(self.out_dir / DATA_IDENTITY) if done else None) or {}
                    write_json(self.out_dir / DATA_IDENTITY, {**identity, **recorded})
            return MetricsLogger(self.out_dir, dist.is_main, cfg.tensorboard, step if resume else None)

        metrics = self._rank0_writes_agreed(records_written, f"write the run's records in {self.out_dir}")

        from tqdm.auto import tqdm

        # off on other ranks and with train.progress false; otherwise tqdm's own TQDM_DISABLE still decides
        hidden = {} if dist.is_main and cfg.progress else {"disable": True}
        bar = tqdm(total=cfg.steps, initial=step, dynamic_ncols=True, **hidden)
        stream = batches.iterate(position)
        input_dtype = engine_input_dtype(engine)
        train_loss, eval_loss = float("nan"), None
        alpha_tracker = AlphaTracker(engine.module, armed=False)  # alpha and 1/std of each DyT's input
        read_alpha = _master_weight_reader(engine)  # bf16 / fp16: alpha as the optimizer holds it
        # ZeRO-1/2/3 keep the gradient norm before clipping, the loss scale divided out; at ZeRO-0
        # torch's AdamW (fp32) keeps none and DeepSpeed's fp16 wrapper keeps it scaled: the harness's own
        own_grad_norm = engine.zero_optimization_stage() == 0
        collective = collective_forward(engine)
        skipped = skipped_before = int(getattr(engine, "skipped_steps", 0))
        skipped_in_a_row = 0
        stopped = True  # until the last step is done
        try:
            while step < cfg.steps:
                started = time.perf_counter()
                logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
                alpha_tracker.armed = logged
                loss_sum, units, extra_sums, grad_norm = 0.0, 0.0, {}, None
                lr = engine.get_lr()[0]  # this step's update's rate (the schedule moves on at its end)
                for micro in range(cfg.grad_accum):
                    what = (f"the training batch of step {step + 1}" if cfg.grad_accum == 1
                            else f"training micro-batch {micro + 1} of {cfg.grad_accum} of step {step + 1}")
                    batch = self._read_together(lambda: to_device(next(stream), dist.device, input_dtype), what)
                    failed = None
                    try:
                        loss, extras = self.task.loss(engine, batch)
                        finite_here = float(torch.isfinite(loss.detach()).all())
                        units_here = float(extras.get("units", cfg.micro_batch_size))
                        extra_values = {name: float(value) for name, value in extras.items() if name != "units"}
                    except Exception as error:  # a GPU out of memory, a bug, on this rank alone
                        failed, finite_here = _forward_failed(error, collective), 1.0
                    # one all-reduce: whether the loss is finite on every rank, and whether every forward ran
                    finite, ran = all_reduce(torch.tensor([finite_here, float(failed is None)]), "min").tolist()
                    if ran == 0:
                        self._stop_together(failed, self._failures_agreed(failed), ForwardFailedError,
                                            f"the forward of {what} failed")
                    if finite == 0:
                        mine = loss.item()
                        went = str(mine) if not math.isfinite(mine) else "not finite on another rank"
                        self._stop_diverged(step + 1, went, f"loss became {went}", last_good)
                    engine.backward(loss)
                    if own_grad_norm and logged and micro == cfg.grad_accum - 1:  # averaged over ranks by now
                        grad_norm = _zero0_gradient_norm(engine)
                    try:
                        engine.step()
                    except Exception as error:  # DeepSpeed's fp16 scaler raises a bare Exception, all ranks alike
                        if "loss scale already at minimum" not in str(error):
                            raise
                        self._stop_diverged(step + 1, "finite, but fp16's loss scale at its minimum",
                                            "fp16 gradients overflowed at the smallest loss scale", last_good)
                    loss_sum += loss.item()
                    units += units_here
                    for name, value in extra_values.items():
                        extra_sums[name] = extra_sums.get(name, 0.0) + value / cfg.grad_accum
                step += 1
                elapsed = time.perf_counter() - started
                names = sorted(extra_sums)
                stats = all_reduce(torch.tensor([loss_sum / cfg.grad_accum, units, *(extra_sums[n] for n in names)],
                                                dtype=torch.float64))
                train_loss = stats[0].item() / dist.world_size
                throughput = stats[1].item() / elapsed
                extra_means = {f"train/{n}": v.item() / dist.world_size for n, v in zip(names, stats[2:])}
                # updates DeepSpeed skipped (fp16 loss-scale overflows; non-finite gradients): a step of this
                # count that moved no weight and left the schedule where it was (saved in checkpoints)
                skipped, skipped_before = int(getattr(engine, "skipped_steps", 0)), skipped
                skipped_in_a_row = skipped_in_a_row + 1 if skipped > skipped_before else 0
                if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    self._stop_diverged(step, f"finite, but {skipped_in_a_row} updates in a row skipped",
                                        f"DeepSpeed skipped the last {skipped_in_a_row} updates (gradients not "
                                        "finite, or fp16 overflows)", last_good)
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", units_per_s=f"{throughput:.0f}",
                                **({"skipped": skipped} if skipped else {}))
                row: dict[str, float] = {}
                if logged:
                    row.update({"train/loss": train_loss, "lr": lr, "throughput": throughput, "step_seconds": elapsed,
                                "skipped_steps": skipped, **extra_means})
                    if not own_grad_norm:
                        grad_norm = engine.get_global_grad_norm()  # None where DeepSpeed computed none
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    with _whole(engine, alpha_tracker.parameters()):
                        row.update(alpha_tracker.metrics(read_alpha))
                if eval_set is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    evaluated = self._evaluate(engine, eval_set)
                    eval_loss = evaluated["loss"]
                    row.update({f"eval/{name}": value for name, value in evaluated.items()})
                    row.update(getattr(self.task, "eval_metrics", lambda _: {})(eval_loss))
                if step == cfg.steps:
                    row.update(_peak_rss_per_rank())
                if row:  # the same steps on every rank
                    self._rank0_writes_agreed(functools.partial(metrics.log, step, row),
                                              f"write the metrics of step {step} to {metrics.path}")
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    if not _weights_finite(engine):  # at ZeRO-0 in fp32 a non-finite gradient is applied as is
                        self._stop_diverged(step, "finite, but the weights not finite after its update",
                                            "the weights became NaN or infinite", last_good)
                    last_good = self._save(engine, step, batches.position)
            stopped = False
        except NonFiniteLossError:
            raise  # every rank stops at the same step (the all-reduced check)
        except (CheckpointSaveError, RunFolderWriteError, BatchReadError, ForwardFailedError):
            raise  # every rank stops on it together (no room, a write or a read that failed), rank 0 saying why
        except UserInputError as error:
            error.every_rank = False  # met while training (a bad file, a failed write): maybe on this rank alone
            raise
        finally:
            bar.close()
            alpha_tracker.close()  # its hooks would measure every later forward of the module
            # TensorBoard's writer re-raises at close what its thread met (a full disk): not over the error
            # that stops the run
            with contextlib.suppress(Exception) if stopped else contextlib.nullcontext():
                metrics.close()
        return TrainResult(self.out_dir, step, train_loss, eval_loss)
