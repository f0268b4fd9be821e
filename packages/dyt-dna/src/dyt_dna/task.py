"""DNA pretraining for the shared harness: HyenaDNA (next base) or Caduceus (masked bases)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dyt.train import ConfigError, TrainConfig

from .config import MODELS, DnaModelConfig
from .data import DnaDataConfig, mask_for_mlm, maybe_reverse_complement, pretraining_datasets, tokens


@dataclass
class DnaConfig:
    """DNA pretraining (dyt-dna). model.arch picks HyenaDNA / Caduceus; model.norm the norm."""

    model: DnaModelConfig = field(default_factory=DnaModelConfig)
    data: DnaDataConfig = field(default_factory=DnaDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.window > self.model.max_len:
            raise ConfigError(f"data.window={self.data.window} is longer than the model's context "
                              f"(model.max_len={self.model.max_len}): lower one or raise the other")


def build_model(cfg: DnaModelConfig) -> nn.Module:
    return MODELS[cfg.arch](cfg)


class DnaPretrainTask:
    def __init__(self, config: DnaConfig):
        self.config = config
        # Every data error surfaces here, before any engine or training starts.
        self.train_rows, self.validation_rows = pretraining_datasets(config.data, config.model.max_len)

    def build_model(self) -> nn.Module:
        model = build_model(self.config.model)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            params = sum(p.numel() for p in model.parameters())
            print(f"{self.config.model.arch} {params / 1e6:.2f}M parameters, norm={self.config.model.norm.kind}, "
                  f"{len(self.train_rows)} training windows of {self.config.data.window} bases", flush=True)
        return model

    def train_dataset(self):
        return self.train_rows

    def eval_dataset(self):
        return self.validation_rows

    def collate(self, rows: list[dict]) -> torch.Tensor:
        return tokens([r["sequence"] for r in rows])

    def loss(self, model, batch):
        # The random flip is drawn here, in the rank's process, from the RNG a checkpoint saves, not in
        # collate: DataLoader workers restart their RNG on --resume, so a run resumed with
        # train.num_workers > 0 drew other flips than the uninterrupted one. Validation is not flipped.
        if self.config.data.rc_augment and model.training:
            batch = maybe_reverse_complement(batch)
        if MODELS[self.config.model.arch].causal:  # next base
            inputs, targets = batch[:, :-1], batch[:, 1:]
        else:
            inputs, targets = mask_for_mlm(batch, self.config.data.mask_prob)
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return loss, {"units": float(batch.numel())}

    def eval_metrics(self, loss: float) -> dict[str, float]:
        return {"eval/perplexity": math.exp(min(loss, 50.0))}
