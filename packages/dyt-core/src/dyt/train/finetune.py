"""Supervised fine-tuning of a classifier with early stopping, and the classification metrics the
recipes' downstream evals report. Single process: evals are small next to pretraining.

Used by dyt-dna (sequence classification) and dyt-wav2vec2 (keyword probe / fine-tune)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .trainer import seed_everything


@dataclass
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 3
    """Stop after this many evaluations without a better validation MCC."""
    eval_every: int = 0
    """Validate every this many steps (0: once per epoch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(true class, predicted class) counts."""
    return torch.bincount(target * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, Matthews correlation (multi-class, Gorodkin's form) and macro F1 from a confusion matrix."""
    c = confusion.double()
    total, correct = c.sum(), c.trace()
    true_counts, predicted_counts = c.sum(1), c.sum(0)
    denominator = torch.sqrt((total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum()))
    mcc = (correct * total - (predicted_counts * true_counts).sum()) / denominator if denominator > 0 else c.new_tensor(0.0)
    diagonal = c.diagonal()
    f1 = torch.where(true_counts + predicted_counts > 0, 2 * diagonal / (true_counts + predicted_counts), c.new_zeros(()))
    present = true_counts > 0
    return {
        "accuracy": (correct / total).item() if total > 0 else math.nan,
        "mcc": mcc.item(),
        "f1": f1[present].mean().item() if present.any() else math.nan,
    }


@dataclass
class FinetuneResult:
    seed: int
    best_step: int
    validation: dict[str, float]
    test: dict[str, dict[str, float]]
    """Metrics per test set."""
    confusion: dict[str, list[list[int]]]
    """(true, predicted) counts per test set."""
    curve: list[dict[str, float]]


def planned_steps(cfg: FinetuneConfig, examples: int) -> int:
    """Optimizer steps ``finetune`` takes over ``examples`` training examples unless it stops early."""
    total = cfg.epochs * math.ceil(examples / cfg.batch_size)
    return min(cfg.max_steps, total) if cfg.max_steps else total


def _predict(model: nn.Module, loader: DataLoader, classes: int) -> tuple[torch.Tensor, float]:
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in loader:
            logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            count += len(labels)
            confusion += confusion_matrix(logits.argmax(-1), labels, classes)
    model.train()
    return confusion, loss_sum / max(1, count)


def finetune(
    make_model: Callable[[], nn.Module],
    train: Dataset,
    validation: Dataset,
    tests: Mapping[str, Dataset],
    collate: Callable[[list[Any]], tuple[Any, torch.Tensor]],
    classes: int,
    cfg: FinetuneConfig,
    seed: int,
    desc: str = "fine-tune",
) -> FinetuneResult:
    """Train ``make_model()`` on ``train``; keep the weights with the best validation MCC; report
    the metrics of those weights on each of ``tests``. Parameters with ``requires_grad=False`` stay frozen (a probe)."""
    from tqdm.auto import tqdm

    seed_everything(seed)
    model = make_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    validation_loader = DataLoader(validation, batch_size=cfg.batch_size, collate_fn=collate)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0 or len(validation) == 0:
        raise ValueError(f"{desc}: {len(train)} training and {len(validation)} validation examples; need both")
    total = planned_steps(cfg, len(train))
    every = cfg.eval_every or steps_per_epoch
    best: tuple[float, int, dict, dict] = (-math.inf, 0, {}, {})
    curve, waited, step = [], 0, 0
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    while step < total and waited < cfg.patience:
        for inputs, labels in loader:
            loss = nn.functional.cross_entropy(model(inputs).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % every == 0 or step == total:
                confusion, validation_loss = _predict(model, validation_loader, classes)
                scores = classification_metrics(confusion)
                curve.append({"step": step, "train/loss": loss.item(), "validation/loss": validation_loss, **scores})
                if scores["mcc"] > best[0]:
                    best, waited = (scores["mcc"], step, scores, copy.deepcopy(model.state_dict())), 0
                else:
                    waited += 1
            if step >= total or waited >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best[3])
    confusions = {name: _predict(model, DataLoader(test, batch_size=cfg.batch_size, collate_fn=collate), classes)[0]
                  for name, test in tests.items()}
    return FinetuneResult(seed, best[1], best[2], {n: classification_metrics(c) for n, c in confusions.items()},
                          {n: c.tolist() for n, c in confusions.items()}, curve)
