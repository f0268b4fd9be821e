"""Pretrain HyenaDNA (LayerNorm vs DyT) and Caduceus (RMSNorm vs DyT) on the same data with the
same seed, fine-tune every checkpoint on DNA classification tasks over several seeds, and write
``report.md`` (tables in mean ± std, loss curves, DyT alpha per layer).

    dyt-dna-compare --out runs/dna-compare --nproc 2

Finished pretraining runs resume and finished evals are reused, so a killed comparison continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from dyt.train import command, load_config, user_errors
from dyt.train.compare import (
    Run,
    add_run_arguments,
    mean_std,
    median_throughput,
    parse_run_arguments,
    peak_rss_per_rank,
    plot_alphas,
    plot_losses,
    prepare_out,
    reuse_or_compute,
    run_training,
)
from dyt.train.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Range
from dyt.train.finetune import FinetuneConfig

from .data import ClassificationData, check_task, load_task, pretraining_datasets
from .eval import evaluate, results_json
from .task import DnaConfig

CONFIGS = [Path("recipes/dna/hyena-tiny.yaml"), Path("recipes/dna/caduceus-tiny.yaml")]
NAMES = {"hyena": "HyenaDNA", "caduceus": "Caduceus"}
INITS = {True: "pretrained", False: "random init"}
"""Every fine-tuning runs from the pretrained checkpoint and from the same model untrained."""


def pretraining_row(run: Run) -> str:
    rows = run.metrics
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    rss = " / ".join(f"{v:.0f}" for v in peak_rss_per_rank(rows[-1]))
    return (f"| {statistics.mean(train[-3:]):.4f} | {last_eval['eval/loss']:.4f} | {last_eval['eval/perplexity']:.3f} "
            f"| {median_throughput(rows):.0f} | {rss} | {run.wall_s:.0f} |")


@user_errors("dyt-dna-compare")
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="dyt-dna-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=Path, nargs="+", default=CONFIGS)
    parser.add_argument("--tasks", nargs="+", default=["species"],
                        help="built-in task names or task folders (see python -m dyt_dna.eval --help)")
    parser.add_argument("--seeds", nargs="+", type=NON_NEGATIVE.arg(int), default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--pretrain-seed", type=NON_NEGATIVE.arg(int), default=0)
    parser.add_argument("--eval-window", type=Range(ge=2).arg(int), default=128, help="built-in tasks: bases per example")
    parser.add_argument("--per-class", type=AT_LEAST_ONE.arg(int), default=100,
                        help="built-in tasks: training examples per class")
    parser.add_argument("--epochs", type=AT_LEAST_ONE.arg(int), default=4)
    parser.add_argument("--max-steps", type=NON_NEGATIVE.arg(int), default=40,
                        help="fine-tuning steps per seed (0: epochs decide)")
    parser.add_argument("--batch-size", type=AT_LEAST_ONE.arg(int), default=16)
    parser.add_argument("--lr", type=POSITIVE.arg(float), default=1e-3)
    add_run_arguments(parser, out="runs/dna-compare")
    args = parse_run_arguments(parser, argv)

    configs = [load_config(DnaConfig, path, args.overrides) for path in args.configs]  # errors before launching
    for spec in args.tasks:
        check_task(spec)
    for config in configs:
        pretraining_datasets(config.data, config.model.max_len)  # data errors early; warms the cache
    tasks = [load_task(spec, args.eval_window, args.per_class) for spec in args.tasks]
    for task, config in ((t, c) for t in tasks for c in configs):
        task.check_length(config.model.max_len, truncate=False)
    finetune_cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=3,
                                  max_steps=args.max_steps, eval_every=max(1, args.max_steps // 4), seeds=args.seeds)
    settings = {"finetune": asdict(finetune_cfg), "window": args.eval_window, "per_class": args.per_class}
    prepare_out(args)

    runs: list[tuple[DnaConfig, str, Run]] = []
    evals: dict[tuple[int, str, str], list[dict]] = {}
    for config, path in zip(configs, args.configs):
        arch = config.model.arch
        for norm in dict.fromkeys([config.model.norm.kind, "dyt"]):
            run = run_training("dyt_dna.train", path, args.out / f"{arch}-{norm}",
                               [*args.overrides, f"model.norm.kind={norm}"], label=f"{NAMES[arch]} {norm}",
                               seed=args.pretrain_seed, launcher=args.launcher, nproc=args.nproc)
            runs.append((config, norm, run))
            for task, (pretrained, init) in ((t, i) for t in tasks for i in INITS.items()):
                print(f"== fine-tune {run.label} ({init}) on {task.name}, seeds {args.seeds}", flush=True)
                evals[(id(run), task.name, init)] = reuse_or_compute(
                    run.dir / f"eval-{task.name}{'' if pretrained else '-random-init'}.json", settings,
                    lambda run=run, task=task, pretrained=pretrained: results_json(
                        task, evaluate(run.dir, task, finetune_cfg, pretrained=pretrained)))
    report = write_report(args, runs, tasks, evals)
    print(f"\nreport: {report}")
    return report


def write_report(args, runs, tasks: list[ClassificationData], evals) -> Path:
    out = args.out
    lines = [
        "# DNA: HyenaDNA and Caduceus, published norm vs DyT",
        "",
        f"Pretraining: {args.nproc} rank(s) under `{args.launcher}`, seed {args.pretrain_seed}, configs "
        f"{', '.join(f'`{p}`' for p in args.configs)}. Validation loss: held-out strains (never trained on).",
        "",
        "| model | norm | final train loss | validation loss | validation perplexity | bases/s | peak RSS per rank (MB) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {NAMES[c.model.arch]} | {norm} {pretraining_row(run)}" for c, norm, run in runs]
    lines += [
        "",
        f"Fine-tuning from each checkpoint (full model, pooled linear head, early stopping on validation MCC), "
        f"seeds {args.seeds}: test-split mean ± std. Each model is also fine-tuned untrained (random init, same "
        "seeds and budget): what pretraining bought is the gap to that row.",
        "",
        "| model | norm | init | task | accuracy | MCC | F1 (macro) |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for config, norm, run in runs:
        for task, init in ((t, i) for t in tasks for i in INITS.values()):
            results = evals[(id(run), task.name, init)]
            metric = {m: [r["test"]["test"][m] for r in results] for m in ("accuracy", "mcc", "f1")}
            lines.append(f"| {NAMES[config.model.arch]} | {norm} | {init} | {task.name} | "
                         f"{mean_std(metric['accuracy'])} | {mean_std(metric['mcc'])} | {mean_std(metric['f1'])} |")
            summary.append({"model": config.model.arch, "norm": norm, "init": init, "task": task.name,
                            "seeds": args.seeds, **metric})
    lines += [""] + [f"- `{t.name}`: {len(t.classes)} classes ({', '.join(t.classes)}); {len(t.train)} / "
                     f"{len(t.validation)} / {len(t.test)} train / validation / test examples. {t.note}" for t in tasks]
    lines.append("")
    for arch in dict.fromkeys(c.model.arch for c, _, _ in runs):
        mine = [run for c, _, run in runs if c.model.arch == arch]
        plot_losses(mine, out / f"{arch}_loss_curves.png", "cross-entropy (nats/base)")
        lines += [f"![{NAMES[arch]} loss curves]({arch}_loss_curves.png)", ""]
        for run in mine:
            if plot_alphas(run, out / f"{arch}_dyt_alpha.png"):
                lines += [f"![{NAMES[arch]} DyT alpha]({arch}_dyt_alpha.png)", ""]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


cli = command("dyt-dna-compare", main)
"""The console script (exit status 0 on success, 2 on bad input)."""

if __name__ == "__main__":
    raise SystemExit(cli())
