"""DNA classification from a pretrained checkpoint: a pooled linear head on the backbone, full
fine-tuning, validation every quarter of the steps, early stopping on validation MCC, several seeds;
accuracy, MCC and F1 on the test split.

    python -m dyt_dna.eval --run runs/dna/hyena-tiny --task species --seeds 0 1 2
    python -m dyt_dna.eval --run RUN --task path/to/genomic_benchmarks/human_nontata_promoters

``--task``: a built-in task (species, coding, start), a GenomicBenchmarks task folder
(``{train,test}/<class>/*.txt``) or a folder with train.csv / dev.csv / test.csv (sequence,label).
Fine-tuning runs on a CUDA GPU where torch sees one (``--device``), else on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from dyt.errors import CommandParser, DistinctValues, help_description, options_given, output_file, user_path
from dyt.train import check_run, load_config, run_model_builder, user_errors
from dyt.train.checkpoint import config_digest, pin_evaluated_checkpoint
from dyt.train.cli import add_device_argument, backends_for_device
from dyt.train.compare import eval_out_seeds, mean_std, read_eval_out
from dyt.train.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, Range
from dyt.train.finetune import (
    Classification,
    FinetuneConfig,
    FinetuneResult,
    Standardize,
    evaluating,
    finetune,
    module_device,
    planned_steps,
)

from .data import BUILTIN_TASKS, ClassificationData, check_task, load_task, tokens
from .task import DnaConfig, build_model

VALIDATIONS = 4
"""Validation runs this many times per fine-tuning run (every quarter of the steps)."""


def add_finetune_arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The fine-tuning options, with the same defaults in ``python -m dyt_dna.eval`` and
    ``dyt-dna-compare``: an eval run by itself gives the numbers the report gives (sized for the
    2-core box; raise ``--per-class``, ``--epochs`` and ``--max-steps`` for a fuller one). Returns
    the options that shape the built-in tasks alone (:func:`check_builtin_options`)."""
    builtin_only = [
        parser.add_argument("--eval-window", type=Range(ge=2).arg(int), default=128,
                            help="built-in tasks: bases per example (at most the model's context)"),
        parser.add_argument("--per-class", type=AT_LEAST_ONE.arg(int), default=100,
                            help="built-in tasks: training examples per class")]
    parser.add_argument("--epochs", type=AT_LEAST_ONE.arg(int), default=4)
    parser.add_argument("--max-steps", type=NON_NEGATIVE.arg(int), default=40,
                        help="fine-tuning steps per seed (0: epochs decide)")
    parser.add_argument("--batch-size", type=AT_LEAST_ONE.arg(int), default=16)
    parser.add_argument("--lr", type=POSITIVE.arg(float), default=1e-3)
    parser.add_argument("--patience", type=AT_LEAST_ONE.arg(int), default=3,
                        help="stop after this many validations without a better MCC")
    add_device_argument(parser)
    return builtin_only


def check_builtin_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None, tasks: list[str],
                          builtin_only: list[argparse.Action]) -> None:
    """Refuse ``--eval-window`` and ``--per-class`` where no task is a built-in one: a task folder's
    files decide its examples, and the option would change nothing while the run looked as if it had.
    A task that is neither (a mistyped name) is named first (:func:`check_task`)."""
    for task in tasks:
        check_task(task)
    if not any(task in BUILTIN_TASKS for task in tasks) and (given := options_given(parser, argv, builtin_only)):
        parser.error(f"{', '.join(given)} shape(s) the built-in tasks' examples, and {' '.join(tasks)} "
                     f"{'is a task folder' if len(tasks) == 1 else 'are task folders'}, whose files decide them: "
                     "drop the option")


def eval_window_error(window: int, tasks: list[str], max_len: int) -> str | None:
    """Why ``--eval-window`` cannot cut the built-in ones of ``tasks`` for a model whose context is
    ``max_len`` bases; None where it can (task folders keep their own lengths: ``--truncate``)."""
    if window > max_len and any(task in BUILTIN_TASKS for task in tasks):
        return f"argument --eval-window: {window} bases is longer than a model's context (model.max_len {max_len})"
    return None


def finetune_settings(args: argparse.Namespace) -> FinetuneConfig:
    """The fine-tuning :func:`add_finetune_arguments` parsed (its validation interval is set per task
    by :func:`finetune_for`)."""
    return FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                          max_steps=args.max_steps)


def finetune_seeds(args: argparse.Namespace) -> list[int]:
    """``--seeds`` in one order, for the results, the report and ``summary.json`` alike."""
    return sorted(args.seeds)


def finetune_for(cfg: FinetuneConfig, examples: int) -> FinetuneConfig:
    """``cfg`` validating :data:`VALIDATIONS` times over the steps it takes on ``examples`` training
    examples (epochs and ``max_steps`` decide them), for the eval and the compare alike."""
    return replace(cfg, eval_every=max(1, math.ceil(planned_steps(cfg, examples) / VALIDATIONS)))


class SequenceClassifier(nn.Module):
    """Backbone features, pooled over positions (reverse-complement invariant for Caduceus-PS),
    standardised per dimension by the training split's statistics before fine-tuning
    (``fit_standardize``; DyT's bounded features spread less than a norm's), then a linear head."""

    def __init__(self, backbone: nn.Module, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.standardize = Standardize(torch.zeros(backbone.feature_dim), torch.ones(backbone.feature_dim))
        self.head = nn.Linear(backbone.feature_dim, classes)

    def pooled(self, batch: torch.Tensor) -> torch.Tensor:
        # One weight per forward for parametrized layers (sigma-reparam): the backbone's own hooks run
        # on its forward, which this bypasses; uncached, each read of a shared weight (Caduceus' two
        # directions and reverse-complement halves) would take a power-iteration step of its own.
        with parametrize.cached():
            return self.backbone.pool(self.backbone.features(batch), batch)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardize(self.pooled(batch)))

    def fit_standardize(self, dataset, collate: Callable, batch_size: int = 64) -> SequenceClassifier:
        """Set the head's input statistics from every example of ``dataset``, as the backbone is now."""
        device = module_device(self)
        with evaluating(self):
            self.standardize = Standardize.fit(
                self.pooled(inputs.to(device))
                for inputs, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate))
        return self


def backbone_builder(run_dir: Path, pretrained: bool = True,
                     device: torch.device | str = "cpu") -> tuple[DnaConfig, Callable[[], nn.Module]]:
    """The run's config and a function that builds its backbone on ``device``: with the trained
    weights (read once here), or untrained with ``pretrained`` False (each call its own
    initialisation); built on the CPU and moved, so a seed draws the same weights on any device."""
    config = load_config(DnaConfig, run_dir / "config.yaml", check_files=False)
    backends_for_device(config, device, str(run_dir))
    build = run_model_builder(run_dir, lambda: build_model(config.model), pretrained)
    return config, lambda: build().to(device)


def evaluate(run_dir: Path, task: ClassificationData, cfg: FinetuneConfig, seeds: list[int],
             pretrained: bool = True, device: torch.device | str = "cpu") -> Iterator[FinetuneResult]:
    """Fine-tune the run's pretrained model on ``task`` once per seed of ``seeds``, yielding each
    result as it finishes; with ``pretrained`` False the same model untrained (each seed's own
    initialisation): the baseline that shows what pretraining bought."""
    config, build_backbone = backbone_builder(run_dir, pretrained, device)

    def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens([r["sequence"] for r in rows]), torch.tensor([r["label"] for r in rows])

    def make_model() -> SequenceClassifier:
        return SequenceClassifier(build_backbone(), len(task.classes)).fit_standardize(task.train, collate)

    for seed in seeds:
        yield finetune(make_model, task.train, task.validation, {"test": task.test}, collate,
                       Classification(len(task.classes)), cfg, seed,
                       desc=f"{config.model.arch}/{config.model.norm.kind}{'' if pretrained else ' (random init)'} "
                            f"{task.name} seed {seed}", device=device)


def result_row(task: ClassificationData, result: FinetuneResult) -> dict:
    """One seed's result as a JSON row, with the task's name and note (e.g. what ``--truncate`` cut)."""
    return {**asdict(result), "task": task.name, "note": task.note}


def task_signature(task: ClassificationData, builtin: bool) -> dict[str, str]:
    """What a task's examples are now, kept in each stored eval's settings, so an eval of examples
    changed since is made again, not reused: a digest of its classes and of each split's sequences
    and labels, as loaded. A built-in task's come from genomes, windowing and pyrodigal's gene calls,
    a folder's from its files and, for a GenomicBenchmarks folder, the validation draw: a new version
    of any of them changes it. (A built-in task's is keyed ``builtin``, as stored before folders were
    signed this way, so that its stored evals stay valid.)"""
    digest = hashlib.sha256(json.dumps(task.classes).encode())
    for split in (task.train, task.validation, task.test):
        for batch in split.select_columns(["sequence", "label"]).iter(batch_size=1024):
            digest.update(json.dumps([batch["sequence"], batch["label"]]).encode())
    return {"builtin" if builtin else "task": task.name, "digest": digest.hexdigest()[:16]}


def summarize(results: list[FinetuneResult]) -> dict[str, list[float]]:
    return {metric: [r.test["test"][metric] for r in results] for metric in ("accuracy", "mcc", "f1")}


@user_errors("dyt_dna.eval")
def main(argv: list[str] | None = None) -> list[FinetuneResult]:
    parser = CommandParser(prog="dyt_dna.eval", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=user_path, required=True, help="a pretraining run directory")
    parser.add_argument("--task", default="species",
                        help=f"a built-in task ({', '.join(BUILTIN_TASKS)}) or a task folder (docs/dna.md); default species")
    parser.add_argument("--seeds", action=DistinctValues, type=SEED.arg(int), nargs="+", default=[0, 1, 2])
    builtin_only = add_finetune_arguments(parser)
    parser.add_argument("--truncate", action="store_true", help="cut sequences longer than the model's context")
    parser.add_argument("--random-init", action="store_true",
                        help="fine-tune the run's model untrained (same config, seeds and budget): the baseline row")
    parser.add_argument("--out", type=output_file,
                        help="keep the per-seed results here (JSON), as each seed finishes; run again with the same "
                             "--out, the seeds it holds for the same settings are read back")
    args = parser.parse_args(argv)
    check_builtin_options(parser, argv, [args.task], builtin_only)
    check_run(args.run, weights=not args.random_init)  # before any data is built
    if args.out:
        read_eval_out(args.out)  # a file that is not an eval's results is refused before any work
    # the weights are loaded once, by evaluate
    config = load_config(DnaConfig, args.run / "config.yaml", check_files=False)
    if error := eval_window_error(args.eval_window, [args.task], config.model.max_len):
        parser.error(error)
    task = load_task(args.task, args.eval_window, args.per_class).check_length(config.model.max_len, args.truncate)
    if task.note:
        print(f"{task.name}: {task.note}", flush=True)
    cfg = finetune_for(finetune_settings(args), len(task.train))
    pretrained = not args.random_init
    name = task.name if pretrained else f"{task.name}-random-init"  # both may share one --out
    settings = {"run_config": config_digest(args.run), "pretrained": pretrained, "finetune": asdict(cfg),
                "window": args.eval_window, "per_class": args.per_class,
                "task_files": task_signature(task, args.task in BUILTIN_TASKS)}  # what --truncate cut, too
    pinned = contextlib.nullcontext()
    if pretrained:
        settings["checkpoint_step"], pinned = pin_evaluated_checkpoint(args.run, config.train.steps)
    if args.out:
        read_eval_out(args.out, {name: settings})  # other settings held there: refused before any fine-tuning
    print(f"fine-tuning on {args.device}", flush=True)
    seeds = finetune_seeds(args)

    def compute(missing: list[int]) -> Iterator[dict]:
        for seed, result in zip(missing, evaluate(args.run, task, cfg, missing, pretrained=pretrained, device=args.device),
                                strict=True):
            print(f"{task.name} seed {seed}: accuracy {result.test['test']['accuracy']:.3f}, "
                  f"mcc {result.test['test']['mcc']:.3f}", flush=True)
            yield {**result_row(task, result), "run": str(args.run)}

    with pinned:
        rows = (eval_out_seeds(args.out, name, settings, seeds, compute, args.device) if args.out
                else list(compute(seeds)))
    results = [FinetuneResult(**{f.name: row[f.name] for f in fields(FinetuneResult)}) for row in rows]
    for metric, values in summarize(results).items():
        print(f"{task.name} {metric}: {mean_std(values)} over seeds {args.seeds}")
    return results


if __name__ == "__main__":
    main()
