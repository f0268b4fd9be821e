"""Run the same LLaMA config with RMSNorm and with DyT (same seed, same data; optionally several
seeds) under a launcher, then write ``report.md`` with the paper-style table and PNG plots.

    dyt-llama-compare --config recipes/llama/tiny.yaml --out runs/llama-compare --nproc 2

Each run resumes if its directory already holds checkpoints, so a killed comparison continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dyt.train import command, load_config, trained_weights, user_errors
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
    run_training,
)
from dyt.train.config import NON_NEGATIVE

from .data import build_datasets, load_documents
from .task import LlamaConfig

NORMS = ("rmsnorm", "dyt")


def run_one(args, norm: str, seed: int) -> Run:
    return run_training(
        "dyt_llama.train", args.config, args.out / f"{norm}-seed{seed}", [*args.overrides, f"model.norm.kind={norm}"],
        label=norm, seed=seed, launcher=args.launcher, nproc=args.nproc,
    )


def summarize(run: Run) -> dict:
    rows = run.metrics
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    return {
        "final_train_loss": statistics.mean(train[-3:]),
        "eval_loss": evals[-1]["eval/loss"],
        "eval_perplexity": evals[-1]["eval/perplexity"],
        "tokens_per_s": median_throughput(rows),
        "peak_rss_mb": peak_rss_per_rank(rows[-1]),
        "wall_s": run.wall_s,
    }


def plot_rmsnorm_s_curves(run: Run, path: Path) -> None:
    """Load the RMSNorm model's last checkpoint and record its norms on one validation batch."""
    from dyt.analysis import NormRecorder, plot_s_curves

    from .model import Llama

    config = load_config(LlamaConfig, run.dir / "config.yaml", check_files=False)
    model = Llama(config.model).eval()
    model.load_state_dict(trained_weights(run.dir))
    _, validation, _ = build_datasets(config.data, config.model.vocab_size, config.model.max_seq_len)
    batch = torch.stack([validation[i] for i in range(min(4, len(validation)))])[:, :-1]
    with torch.no_grad(), NormRecorder(model, max_points=3000) as recorder:
        model(batch)
    plot_s_curves(recorder.records, path, title="RMSNorm model: norm input vs output (validation text)")


def write_report(args, runs: list[Run], held_out: list[str]) -> Path:
    out = args.out
    summaries = {id(r): summarize(r) for r in runs}
    lines = [
        "# LLaMA: RMSNorm vs DyT",
        "",
        f"Config `{args.config}` with {args.nproc} rank(s) under `{args.launcher}`; seeds "
        f"{sorted({r.seed for r in runs})}. Validation: whole documents held out of training: "
        f"{', '.join(held_out)}.",
        "",
        "| norm | final train loss | validation loss | validation perplexity | tokens/s | peak RSS per rank (MB) | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for norm in args.norms:
        mine = [summaries[id(r)] for r in runs if r.label == norm]
        rss = " / ".join(f"{statistics.mean(v):.0f}" for v in zip(*(m["peak_rss_mb"] for m in mine)))  # mean over seeds
        lines.append(
            f"| {norm} | {mean_std([m['final_train_loss'] for m in mine])} | {mean_std([m['eval_loss'] for m in mine])} "
            f"| {mean_std([m['eval_perplexity'] for m in mine], 1)} | {mean_std([m['tokens_per_s'] for m in mine], 0)} "
            f"| {rss} | {mean_std([m['wall_s'] for m in mine], 0)} |"
        )
    plot_losses(runs, out / "loss_curves.png", "cross-entropy (nats/token)")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    dyt_runs = [r for r in runs if r.label == "dyt"]
    if dyt_runs and plot_alphas(dyt_runs[0], out / "dyt_alpha.png"):
        lines += ["![DyT alpha per layer](dyt_alpha.png)", ""]
    rms_runs = [r for r in runs if r.label == "rmsnorm"]
    if rms_runs:
        plot_rmsnorm_s_curves(rms_runs[0], out / "rmsnorm_s_curves.png")
        lines += ["![RMSNorm S-curves](rmsnorm_s_curves.png)", ""]
    (out / "summary.json").write_text(json.dumps(
        [{"norm": r.label, "seed": r.seed, **summaries[id(r)]} for r in runs], indent=1))
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


@user_errors("dyt-llama-compare")
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="dyt-llama-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("recipes/llama/tiny.yaml"))
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=["rmsnorm", "dyt", "layernorm", "identity"])
    parser.add_argument("--seeds", nargs="+", type=NON_NEGATIVE.arg(int), default=[0])
    add_run_arguments(parser, out="runs/llama-compare")
    args = parse_run_arguments(parser, argv)

    config = load_config(LlamaConfig, args.config, args.overrides)  # config errors before any launch
    build_datasets(config.data, config.model.vocab_size, config.model.max_seq_len)  # and data errors; warms the cache
    held_out = list(load_documents(config.data)["validation"]["title"])
    prepare_out(args)
    runs = [run_one(args, norm, seed) for seed in args.seeds for norm in args.norms]
    report = write_report(args, runs, held_out)
    print(f"\nreport: {report}")
    return report


cli = command("dyt-llama-compare", main)
"""The console script (exit status 0 on success, 2 on bad input)."""

if __name__ == "__main__":
    raise SystemExit(cli())
