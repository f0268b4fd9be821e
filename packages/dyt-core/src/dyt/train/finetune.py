"""Supervised fine-tuning with early stopping, the one loop every downstream eval uses; the
classification metrics; the standardising every downstream head reads its features through.
Single process: evals are small next to pretraining.

Used by dyt-dna (sequence classification) and dyt-wav2vec2 (keyword probe and fine-tune:
``Classification``; CTC speech recognition: its own ``Objective``). The evals run on one device
(``--device``: a GPU where torch sees one); data is read and collated on the CPU, and each batch
is moved to the device as the loop takes it (:func:`on_device`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .trainer import like_length_batches, seed_everything, to_device, weight_decay_groups

SCHEDULES = ("constant", "tri-stage")


def on_device(batches: Iterable[Any], device: torch.device | str) -> Iterator[Any]:
    """``batches`` moved to ``device`` one at a time, as they are taken: a loader (and its workers)
    reads and collates on the CPU; only the batch in use is on the device."""
    for batch in batches:
        yield to_device(batch, torch.device(device))


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are (the CPU for one without any)."""
    return next(module.parameters(), torch.empty(0)).device


@dataclass
class FinetuneConfig:
    """How :func:`finetune` trains; no seeds: each eval calls it once per seed of its own."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    """AdamW decay on matrices only, as in pretraining (``weight_decay_groups``): DyT's alpha, norm
    parameters, biases and the baselines' scalars are not decayed."""
    patience: int = 3
    """Stop after this many evaluations without a better validation score (the objective's selection
    metric: MCC for keywords and DNA, CER for CTC)."""
    eval_every: int = 0
    """Validate every this many steps (0: once per epoch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit)."""
    clip_grad_norm: float = 0.0
    """Clip the gradient norm to this (0: no clipping)."""
    schedule: str = "constant"
    """The learning rate over the planned steps: ``constant``, or ``tri-stage`` (fairseq's wav2vec 2.0
    fine-tuning schedule: :func:`tri_stage`)."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(true class, predicted class) counts."""
    return torch.bincount(target * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, Matthews correlation (multi-class, Gorodkin's form) and macro F1 from a confusion matrix
    (rows true, columns predicted), F1 averaged over the classes that are true or predicted somewhere,
    as scikit-learn's ``f1_score(average="macro")``: a class predicted but never true scores 0."""
    c = confusion.double()
    total, correct = c.sum(), c.trace()
    true_counts, predicted_counts = c.sum(1), c.sum(0)
    denominator = torch.sqrt((total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum()))
    mcc = (correct * total - (predicted_counts * true_counts).sum()) / denominator if denominator > 0 else c.new_tensor(0.0)
    diagonal = c.diagonal()
    present = true_counts + predicted_counts > 0  # scikit-learn's labels: true or predicted somewhere
    f1 = torch.where(present, 2 * diagonal / (true_counts + predicted_counts), c.new_zeros(()))
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
    details: dict[str, Any]
    """What the objective keeps per test set besides its metrics (a confusion matrix, example transcripts)."""
    curve: list[dict[str, float]]


class Objective(Protocol):
    """What a fine-tuning run minimises, and how a model is scored on a dataset.

    ``finetune`` owns the loop (seeding, optimizer, clipping, validation cadence, early stopping,
    keeping the best weights); an objective owns the loss and the metrics, so a classifier and a CTC
    recogniser share one loop."""

    selection: str
    """The validation metric that picks the kept weights."""
    higher_is_better: bool

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> tuple[dict[str, float], Any]:
        """Metrics over ``loader``'s batches (on the model's device; ``loss`` among the metrics) and
        the details kept for test sets."""
        ...


@dataclass
class Classification:
    """Cross-entropy over ``classes``; scored by accuracy, MCC (selects) and macro F1; keeps the
    confusion matrix. Batches are ``(inputs, labels)``."""

    classes: int
    selection: str = "mcc"
    higher_is_better: bool = True

    def loss(self, model: nn.Module, batch: tuple[Any, torch.Tensor]) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(model(inputs).float(), labels)

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> tuple[dict[str, float], list[list[int]]]:
        confusion = torch.zeros(self.classes, self.classes, dtype=torch.long)
        loss_sum, count = 0.0, 0
        for inputs, labels in loader:
            logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            count += len(labels)
            confusion += confusion_matrix(logits.argmax(-1).cpu(), labels.cpu(), self.classes)
        return {"loss": loss_sum / max(1, count), **classification_metrics(confusion)}, confusion.tolist()


class Standardize(nn.Module):
    """Features shifted and scaled per dimension by fixed statistics, those of the training split as
    the model first sees it (a BatchNorm frozen before training, without affine; MAE's linear probe).

    Why: a head trained for a fixed budget at a fixed learning rate learns more slowly on inputs of
    smaller spread, so a downstream eval with a raw head ranks feature *scale* as much as content.
    DyT's bounded outputs spread ~3x less than a LayerNorm's (docs/wav2vec2.md). Every model gets
    the same treatment; it is a fixed reparametrisation of the linear head that follows.

    The std is ``sqrt(variance + EPS * mean variance)``: BatchNorm's eps, in units of the features'
    own mean variance so that features of any overall scale are treated alike. Without it a
    dimension constant over the training split (a saturated DyT channel) is divided by ~0, and any
    change in it on held-out data reaches the head as values of 1e6 and more (validation losses of
    2e7 measured); with BatchNorm's absolute eps, the dimensions of DyT's less spread features
    would be shrunk more than a LayerNorm's (up to 8% for a pretrained speech encoder's)."""

    EPS = 1e-5
    """Added to each dimension's variance, times the mean variance over dimensions
    (``torch.nn.BatchNorm1d``'s eps for features of unit spread)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    @classmethod
    def fit(cls, chunks: torch.Tensor | Iterable[torch.Tensor]) -> Standardize:
        """Statistics over the rows of ``chunks`` (one tensor, or several, of rows: examples or
        frames, by dim), accumulated in float64 so that a million frames cost no precision; kept
        in the rows' dtype."""
        count, total, squares, dtype = 0, 0.0, 0.0, torch.float32
        for chunk in [chunks] if isinstance(chunks, torch.Tensor) else chunks:
            rows, dtype = chunk.detach().double().reshape(-1, chunk.shape[-1]), chunk.dtype
            count, total, squares = count + len(rows), total + rows.sum(0), squares + (rows * rows).sum(0)
        if count < 2:
            raise ValueError(f"Standardize.fit: {count} rows; need at least 2")
        mean = total / count
        variance = (squares - count * mean * mean).clamp_min(0) / (count - 1)
        std = (variance + cls.EPS * variance.mean()).sqrt()
        # Every dimension constant (a degenerate backbone): centred only; fine-tuning may still move it.
        return cls(mean.to(dtype), std.where(variance.any(), torch.ones_like(std)).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LengthBatches(Sampler[list[int]]):
    """Batches of examples of similar length, in a new random order every epoch: sort by length
    (ties broken at random), cut into batches, shuffle the batches (fairseq's ordering for speech).
    A random batch of utterances is padded to its longest, so with lengths that vary 100-fold most
    of its frames would be padding."""

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator):
        self.lengths = torch.as_tensor(lengths, dtype=torch.int64)
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        # argsort of rand, not randperm: the draws this sampler made before it shared the ordering
        shuffled = torch.argsort(torch.rand(len(self.lengths), generator=self.generator), stable=True)
        for batch in like_length_batches(shuffled, self.lengths, self.batch_size, self.generator):
            yield batch.tolist()


def tri_stage(step: int, total: int, phases: tuple[float, float, float] = (0.1, 0.4, 0.5),
              init_scale: float = 0.01, final_scale: float = 0.05) -> float:
    """The learning rate's multiplier at ``step`` of ``total``: fairseq's ``tri_stage`` schedule with
    the wav2vec 2.0 fine-tuning settings (``phase_ratio [0.1, 0.4, 0.5]``, ``init_lr_scale 0.01``,
    ``final_lr_scale 0.05``): linear warm-up, a hold at the peak, then exponential decay. A constant
    rate leaves the weights wherever the last noisy steps put them; the decay settles them."""
    warmup, hold = int(phases[0] * total), int(phases[1] * total)
    decay = max(1, total - warmup - hold)
    if step < warmup:
        return init_scale + (1.0 - init_scale) * step / warmup
    if step < warmup + hold:
        return 1.0
    return final_scale ** (min(step - warmup - hold, decay) / decay)


def planned_steps(cfg: FinetuneConfig, examples: int) -> int:
    """Optimizer steps ``finetune`` takes over ``examples`` training examples unless it stops early."""
    total = cfg.epochs * math.ceil(examples / cfg.batch_size)
    return min(cfg.max_steps, total) if cfg.max_steps else total


@contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode without gradients for the block, then back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(training)


def _evaluate(model: nn.Module, objective: Objective, loader: DataLoader) -> tuple[dict[str, float], Any]:
    with evaluating(model):
        return objective.evaluate(model, on_device(loader, module_device(model)))


def finetune(
    make_model: Callable[[], nn.Module],
    train: Dataset,
    validation: Dataset,
    tests: Mapping[str, Dataset],
    collate: Callable[[list[Any]], Any],
    objective: Objective,
    cfg: FinetuneConfig,
    seed: int,
    desc: str = "fine-tune",
    lengths: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> FinetuneResult:
    """Train ``make_model()`` on ``train`` with ``objective``'s loss; keep the weights with the best
    validation ``objective.selection``; report the metrics of those weights on each of ``tests``.
    Parameters with ``requires_grad=False`` stay frozen (a probe). With ``lengths`` (one per
    training example), each batch holds examples of similar length (``LengthBatches``). The model
    trains and is scored on ``device`` (``make_model`` may build it there already: a head fitted
    to the backbone's features reads them there)."""
    from tqdm.auto import tqdm

    seed_everything(seed)
    model = make_model().to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    if lengths is None:
        loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    else:
        if len(lengths) != len(train):
            raise ValueError(f"{desc}: {len(lengths)} lengths for {len(train)} training examples")
        loader = DataLoader(train, batch_sampler=LengthBatches(lengths, cfg.batch_size, generator), collate_fn=collate)
    validation_loader = DataLoader(validation, batch_size=cfg.batch_size, collate_fn=collate)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0 or len(validation) == 0:
        raise ValueError(f"{desc}: {len(train)} training and {len(validation)} validation examples; need both")
    total = planned_steps(cfg, len(train))
    every = cfg.eval_every or steps_per_epoch
    scale = (lambda s: tri_stage(s, total)) if cfg.schedule == "tri-stage" else (lambda s: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
    sign = 1.0 if objective.higher_is_better else -1.0
    best: tuple[float, int, dict, dict] = (-math.inf, 0, {}, {})
    curve, waited, step = [], 0, 0
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    while step < total and waited < cfg.patience:
        for batch in on_device(loader, device):
            loss = objective.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % every == 0 or step == total:
                scores, _ = _evaluate(model, objective, validation_loader)
                curve.append({"step": step, "train/loss": loss.item(), "validation/loss": scores["loss"],
                              **{k: v for k, v in scores.items() if k != "loss"}})
                if sign * scores[objective.selection] > best[0]:
                    best, waited = (sign * scores[objective.selection], step, scores, copy.deepcopy(model.state_dict())), 0
                else:
                    waited += 1
            if step >= total or waited >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best[3])
    tested = {name: _evaluate(model, objective, DataLoader(test, batch_size=cfg.batch_size, collate_fn=collate))
              for name, test in tests.items()}
    return FinetuneResult(seed, best[1], best[2], {n: t[0] for n, t in tested.items()},
                          {n: t[1] for n, t in tested.items()}, curve)
