"""A tiny recipe for testing the shared harness: regression with an MLP, dropout and a DyT.

Synthetic data is fine here: this checks the harness's mechanics (resume, ranks, checkpoints),
not DyT's quality. Run as ``python tests/toy_recipe.py --config ... --set ...`` or under a launcher.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).parent))

from dyt import NormConfig, apply_norm_free, make_norm  # noqa: E402
from dyt.train import TrainConfig, UserInputError, run_recipe  # noqa: E402


@dataclass
class ToyModelConfig:
    width: int = 16
    dropout: float = 0.1
    bias: bool = True
    """False with ``norm.kind: identity``: a model of matrices only (one optimizer group)."""
    norm: NormConfig = field(default_factory=lambda: NormConfig(kind="dyt"))


@dataclass
class ToyDataConfig:
    examples: int = 256
    nan_at_step: int = 0
    """Make the loss NaN at this optimizer step (0: never): for testing the non-finite stop."""

    nan_gradient_from_step: int = 0
    """From this optimizer step on, every gradient is NaN while the loss stays finite (0: never)."""

    eval_noise: float = 0.0
    """Validation draws random numbers as a real task's does, at each of its stages: every example's
    target gets ``eval_noise`` x a uniform draw when it is read, every batch's when it is collated,
    and the loss one more (0: none). For testing that validation scores the same draws on any
    world size and any number of data-loading workers."""

    unreadable_from_read: int = 0
    """On rank ``fault_rank``, reading an example of ``unreadable_split`` fails from this read on,
    counted from 1 in this process, with a data error (0: never): a file damaged or gone mid-run.
    For testing that every rank stops together."""

    unreadable_split: Literal["train", "validation"] = "train"
    forward_fails_at_step: int = 0
    """On rank ``fault_rank``, the training forward of this optimizer step raises a RuntimeError (0:
    never): a GPU out of memory on one rank."""

    validation_forward_fails: bool = False
    """On rank ``fault_rank``, every validation forward raises a RuntimeError."""

    fault_rank: int = 1
    data_made_otherwise: bool = False
    """Rank ``fault_rank``'s data identity differs from the others' (``Task.data_identity``): its data
    made otherwise on its node."""

    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset({"nan_at_step", "unreadable_from_read",
                                                             "forward_fails_at_step", "data_made_otherwise",
                                                             "validation_forward_fails"})
    """A fault injected once: a resume after the stop runs without it (dyt.train.config.resume_changes)."""


@dataclass
class ToyConfig:
    """Toy regression recipe."""

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ToyTask:
    def __init__(self, config: ToyConfig):
        self.config = config
        self.calls = 0

    def build_model(self) -> nn.Module:
        width, bias = self.config.model.width, self.config.model.bias
        model = nn.Sequential(
            nn.Linear(4, width, bias=bias),
            make_norm(self.config.model.norm, width),
            nn.GELU(),
            nn.Dropout(self.config.model.dropout),
            nn.Linear(width, 1, bias=bias),
        )
        return apply_norm_free(model, self.config.model.norm)  # sigma-reparam: a buffer per linear

    def _data(self, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.config.data.examples, 4, generator=g)
        y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.05 * torch.randn(len(x), 1, generator=g)
        return TensorDataset(x, y)

    def data_identity(self) -> dict[str, str]:
        cfg = self.config.data
        otherwise = cfg.data_made_otherwise and os.environ.get("RANK", "0") == str(cfg.fault_rank)
        return {"toy data": "made otherwise" if otherwise else "as always"}

    def train_dataset(self):
        return self._maybe_unreadable(self._data(0), "train")

    def eval_dataset(self):
        data = self._data(1)
        data = _NoisyReads(data, self.config.data.eval_noise) if self.config.data.eval_noise else data
        return self._maybe_unreadable(data, "validation")

    def _maybe_unreadable(self, data, split: str):
        cfg = self.config.data
        if cfg.unreadable_from_read and split == cfg.unreadable_split and \
                os.environ.get("RANK", "0") == str(cfg.fault_rank):
            return _UnreadableFrom(data, cfg.unreadable_from_read)
        return data

    def collate(self, items):
        if len(items[0]) == 3:  # _NoisyReads's (x, y, noise): the batch draws once more
            x, y, noise = torch.utils.data.default_collate(items)
            return x, y + noise[:, None] * torch.rand(len(y), 1)
        return torch.utils.data.default_collate(items)

    def loss(self, model, batch):
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        on_fault_rank = os.environ.get("RANK", "0") == str(self.config.data.fault_rank)
        if not torch.is_grad_enabled():  # validation (it runs under no_grad)
            if self.config.data.validation_forward_fails and on_fault_rank:
                raise RuntimeError("an injected failure of a validation forward (data.validation_forward_fails)")
            if self.config.data.eval_noise:
                loss = loss + self.config.data.eval_noise * torch.rand(())
        else:  # a training micro-batch
            self.calls += 1
            step = (self.calls - 1) // self.config.train.grad_accum + 1
            if step == self.config.data.nan_at_step:
                loss = loss * float("nan")
            if step == self.config.data.forward_fails_at_step and on_fault_rank:
                raise RuntimeError(f"an injected failure of the forward of step {step} (data.forward_fails_at_step)")
            if 0 < self.config.data.nan_gradient_from_step <= step:  # 0 * sqrt(0): the value 0, the gradient NaN
                first = next(model.parameters()).sum()
                loss = loss + 0.0 * torch.sqrt(first - first.detach())
        return loss, {"units": float(len(x))}


class _NoisyReads(torch.utils.data.Dataset):
    """The validation examples, each target with a draw made when it is read (ToyDataConfig.eval_noise)."""

    def __init__(self, data: TensorDataset, noise: float):
        self.data, self.noise = data, noise

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, y = self.data[index]
        return x, y + self.noise * torch.rand(1), torch.tensor(self.noise)


class _UnreadableFrom(torch.utils.data.Dataset):
    """``data`` whose reads fail from the ``first``-th on (ToyDataConfig.unreadable_from_read)."""

    def __init__(self, data, first: int):
        self.data, self.first, self.reads = data, first, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads >= self.first:
            raise _ToyDataError(f"example {index} of the toy data is unreadable (data.unreadable_from_read)")
        return self.data[index]


class _ToyDataError(UserInputError):
    kind = "data error"


if __name__ == "__main__":
    run_recipe(ToyConfig, ToyTask, ends_process=True)
