"""The training loop every recipe shares: DeepSpeed engine, resumable data order, validation,
checkpoints, metrics, progress, and a stop on a non-finite loss.

A recipe supplies a :class:`Task` (model, datasets, loss); the harness does the rest.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..analysis import dyt_layers
from ..errors import UserInputError
from . import checkpoint
from .config import TrainConfig, dump_yaml, read_json_object
from .distributed import DistInfo, all_reduce, init_distributed
from .metrics import MetricsLogger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class CheckpointSaveError(UserInputError):
    """A checkpoint could not be written (disk full, quota, permissions); the message names the step
    that was not saved and the complete checkpoint a resume will start from."""

    kind = "checkpoint error"
    every_rank = False  # one rank's write fails; that rank reports it


class Task(Protocol):
    """What a recipe provides. ``loss`` returns the loss and extra scalars; an extra named
    ``units`` (e.g. tokens in the batch) sets the unit of the throughput metric, and every other
    extra is averaged over the step and logged as ``train/<name>``, and over validation batches as
    ``eval/<name>``. Optionally,
    ``eval_metrics(eval_loss) -> dict`` adds derived validation metrics (e.g. perplexity)."""

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
    """LR multiplier: linear warmup to 1, then cosine down to min_lr / lr at the last step."""
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config derived from the train settings, with cfg.deepspeed_config merged over."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed_config: no such file {path}")
        _merge(config, read_json_object(path, "train.deepspeed_config"))
    return config


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move a batch to ``device``; floating tensors (waveforms, features) also to the engine's
    bf16/fp16 weights' dtype, so a recipe's float inputs meet its half-precision layers."""
    if isinstance(batch, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and batch.is_floating_point() else batch.dtype
        return batch.to(device, dtype=dtype, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device, float_dtype) for v in batch)
    return batch


HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _peak_rss_per_rank(dist: DistInfo) -> dict[str, float]:
    """Peak resident memory of every rank's process, in MB (Linux reports ru_maxrss in KB)."""
    import resource

    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.world_size)]
    torch.distributed.all_gather(everyone, mine)
    return {f"peak_rss_mb/rank{i}": t.item() for i, t in enumerate(everyone)}


class ResumableBatches:
    """Micro-batches in a fixed order for (seed, epoch, rank), startable at any micro-batch index,
    so that a resumed run sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, dataset: Dataset, task: Task, cfg: TrainConfig, dist: DistInfo):
        self.dataset, self.task, self.cfg, self.dist = dataset, task, cfg, dist
        per_rank = len(dataset) // dist.world_size
        self.per_epoch = per_rank // cfg.micro_batch_size
        if self.per_epoch == 0:
            raise UserInputError(
                f"the training set has {len(dataset)} examples: fewer than one micro-batch "
                f"({cfg.micro_batch_size}) per rank for {dist.world_size} rank(s); lower train.micro_batch_size "
                "or give more data"
            )

    def _indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        usable = self.per_epoch * self.cfg.micro_batch_size * self.dist.world_size
        return order[:usable][self.dist.rank :: self.dist.world_size]

    def iterate(self, start: int) -> Iterator[Any]:
        epoch, offset = divmod(start, self.per_epoch)
        while True:
            indices = self._indices(epoch)[offset * self.cfg.micro_batch_size :]
            loader = DataLoader(
                self.dataset,
                batch_size=self.cfg.micro_batch_size,
                sampler=indices,
                drop_last=True,
                collate_fn=self.task.collate,
                num_workers=self.cfg.num_workers,
                generator=torch.Generator().manual_seed(epoch),  # keeps the global RNG untouched
            )
            yield from loader
            epoch, offset = epoch + 1, 0


class Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, full_config: Any = None):
        self.task, self.cfg = task, cfg
        self.full_config = full_config if full_config is not None else cfg
        self.dist = init_distributed()
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"

    def _build(self):
        import deepspeed

        seed_everything(self.cfg.seed)  # same initial weights on every rank
        model = self.task.build_model()
        optimizer = torch.optim.AdamW(
            _param_groups(model, self.cfg.weight_decay), lr=self.cfg.lr, betas=self.cfg.betas
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.cfg))
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(self.cfg)
        )
        seed_everything(self.cfg.seed + 7919 * (self.dist.rank + 1))  # distinct dropout per rank
        return engine

    def _check_validation_size(self, dataset: Dataset) -> None:
        if len(dataset) < self.dist.world_size:  # a rank without a batch could not name the extras
            raise UserInputError(f"the validation set has {len(dataset)} examples, fewer than the {self.dist.world_size} "
                                 "ranks: give more validation data or launch fewer ranks")

    def _evaluate(self, engine, dataset: Dataset) -> dict[str, float]:
        """Validation loss and the mean of every extra the task's loss reports (bar ``units``),
        over ``eval_batches`` micro-batches per rank, averaged over ranks."""
        self._check_validation_size(dataset)
        indices = list(range(self.dist.rank, len(dataset), self.dist.world_size))
        loader = DataLoader(
            dataset,
            batch_size=self.cfg.micro_batch_size,
            sampler=indices,
            collate_fn=self.task.collate,
            num_workers=self.cfg.num_workers,
            generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
        )
        sums: dict[str, float] = {}
        batches = 0
        engine.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= self.cfg.eval_batches:
                    break
                loss, extras = self.task.loss(engine, _to_device(batch, self.dist.device, HALF_PRECISION.get(self.cfg.precision)))
                for name, value in {"loss": loss.item(), **extras}.items():
                    if name != "units":
                        sums[name] = sums.get(name, 0.0) + float(value)
                batches += 1
        engine.train()
        # Every rank has at least one batch, so every rank reduces the same names in the same order.
        names = ["loss"] + sorted(n for n in sums if n != "loss")
        count = all_reduce(torch.tensor([float(batches)], dtype=torch.float64))
        if count.item() == 0:
            raise ValueError("the validation set has no examples for this many ranks")
        totals = all_reduce(torch.tensor([sums.get(n, 0.0) for n in names], dtype=torch.float64))
        return {n: (t / count).item() for n, t in zip(names, totals)}

    def _save(self, engine, step: int, micro_batches: int) -> Path:
        """A checkpoint of ``step``; a failed write (disk full, ...) stops the run with the step it could
        not save and the complete checkpoint that ``--resume`` will take (the failed one never got
        its COMPLETE marker, and older ones are deleted only after a new one is complete)."""
        client = {"step": step, "micro_batches": micro_batches}
        try:
            return checkpoint.save(engine, self.ckpt_root, step, client, self.dist, self.cfg.keep_checkpoints)
        except (OSError, RuntimeError) as error:
            done = checkpoint.complete_checkpoints(self.ckpt_root)
            cause = " ".join(str(error).split())[:300]
            try:
                cause += f"; {shutil.disk_usage(self.ckpt_root).free / 2**20:.0f} MiB free there"
            except OSError:
                pass
            resume = (f"--resume continues from step {checkpoint.step_of(done[-1])} ({done[-1]})" if done
                      else "there is no complete checkpoint yet: --resume starts from step 0")
            raise CheckpointSaveError(
                f"could not save the checkpoint of step {step} in {self.ckpt_root} ({cause}); {resume}. "
                "Free disk space (or point train.out_dir elsewhere) and run again with --resume"
            ) from error

    def fit(self, resume: bool = False) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        train_set, eval_set = self.task.train_dataset(), self.task.eval_dataset()
        # Too little data is an error before the engine is built.
        batches = ResumableBatches(train_set, self.task, cfg, dist)
        if eval_set is not None and cfg.eval_every:
            self._check_validation_size(eval_set)
        engine = self._build()

        step, micro_batches, last_good = 0, 0, None
        if resume:
            done = checkpoint.complete_checkpoints(self.ckpt_root)
            if done:
                state = checkpoint.load(engine, done[-1], dist)
                step, micro_batches, last_good = state["step"], state["micro_batches"], done[-1]
                if dist.is_main:
                    print(f"resumed from {done[-1]} (step {step})", flush=True)
            elif dist.is_main:
                print(f"nothing to resume in {self.ckpt_root}; starting fresh", flush=True)
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(self.full_config))
        metrics = MetricsLogger(self.out_dir, dist.is_main, cfg.tensorboard, step if resume else None)

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, disable=not (dist.is_main and cfg.progress), dynamic_ncols=True)
        stream = batches.iterate(micro_batches)
        train_loss, eval_loss = float("nan"), None
        try:
            while step < cfg.steps:
                started = time.perf_counter()
                loss_sum, units, extra_sums = 0.0, 0.0, {}
                for _ in range(cfg.grad_accum):
                    batch = _to_device(next(stream), dist.device, HALF_PRECISION.get(cfg.precision))
                    micro_batches += 1
                    loss, extras = self.task.loss(engine, batch)
                    finite = all_reduce(torch.isfinite(loss.detach()).to(torch.float32).reshape(1).cpu(), "min")
                    if finite.item() == 0:
                        raise NonFiniteLossError(
                            f"loss became {loss.item()} at step {step + 1}; "
                            f"last good checkpoint: {last_good or 'none yet'}"
                        )
                    engine.backward(loss)
                    engine.step()
                    loss_sum += loss.item()
                    units += float(extras.get("units", cfg.micro_batch_size))
                    for name, value in extras.items():
                        if name != "units":
                            extra_sums[name] = extra_sums.get(name, 0.0) + float(value) / cfg.grad_accum
                step += 1
                elapsed = time.perf_counter() - started
                names = sorted(extra_sums)
                stats = all_reduce(torch.tensor([loss_sum / cfg.grad_accum, units, *(extra_sums[n] for n in names)],
                                                dtype=torch.float64))
                train_loss = stats[0].item() / dist.world_size
                throughput = stats[1].item() / elapsed
                extra_means = {f"train/{n}": v.item() / dist.world_size for n, v in zip(names, stats[2:])}
                lr = engine.get_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", units_per_s=f"{throughput:.0f}")
                row: dict[str, float] = {}
                if step % cfg.log_every == 0 or step == cfg.steps:
                    row.update({"train/loss": train_loss, "lr": lr, "throughput": throughput, "step_seconds": elapsed,
                                **extra_means})
                    row.update({f"alpha/{p}": m.alpha.item() for p, m in dyt_layers(engine.module)})
                if eval_set is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    evaluated = self._evaluate(engine, eval_set)
                    eval_loss = evaluated["loss"]
                    row.update({f"eval/{name}": value for name, value in evaluated.items()})
                    row.update(getattr(self.task, "eval_metrics", lambda _: {})(eval_loss))
                if step == cfg.steps:
                    row.update(_peak_rss_per_rank(dist))
                if row:
                    metrics.log(step, row)
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    last_good = self._save(engine, step, micro_batches)
        except UserInputError as error:
            error.every_rank = False  # met while training (a bad file, a failed write): maybe on this rank alone
            raise
        finally:
            bar.close()
            metrics.close()
        return TrainResult(self.out_dir, step, train_loss, eval_loss)
