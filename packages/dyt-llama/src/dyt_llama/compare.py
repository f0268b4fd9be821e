"""Run the same LLaMA config with RMSNorm and with DyT (same seed, same data; optionally several
seeds and a sweep grid) under a launcher, then write ``report.md`` with the paper-style table, a
verdict per row, sweep tables and heatmaps, and PNG plots.

    dyt-llama-compare --out runs/llama-compare --nproc 2 [--seeds 0 1 2] [--sweep KEY=V1,V2 ...]

Each run resumes if its directory already holds checkpoints, and a finished one is not launched
again, so a killed comparison continues. A run whose training loss goes NaN or infinite is reported as
diverged (no verdict on its cells) and the comparison goes on.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from dyt.errors import CommandParser, DistinctValues, help_description, user_path
from dyt.train import command, load_config, load_run_weights, trained_weights, user_errors
from dyt.train.compare import (
    Run,
    add_run_arguments,
    baseline_norm,
    cells_of,
    describe_sweep,
    divergence_notes,
    judge,
    mean_std,
    parse_run_arguments,
    plan_runs,
    plot_alphas_of_first,
    plot_losses,
    prepare_out,
    rows_with,
    settings_notes,
    shown_path,
    sweep_section,
    train_runs,
    tuned_keys,
    validation_share,
)
from dyt.train.config import SEED
from dyt.train.jsonio import write_json, write_text_whole
from dyt.train.trainer import validation_positions

from .data import build_datasets, load_documents
from .recipe import SPEC
from .task import LlamaConfig


def run_config(run: Run) -> LlamaConfig:
    """The config a run trained with, as it saved it (its norm resolved, whatever its ``--norms`` name)."""
    return load_config(LlamaConfig, run.dir / "config.yaml", check_files=False)


def plot_s_curves(run: Run, path: Path) -> None:
    """Load a (normalised) model's last checkpoint and record its norms on one validation batch (output
    before the per-channel weight: :class:`dyt.analysis.NormRecorder`)."""
    from dyt.analysis import NormRecorder, plot_s_curves

    from .model import Llama

    config = run_config(run)
    model = Llama(config.model).eval()
    load_run_weights(model, trained_weights(run.dir), run.dir)
    _, validation, _ = build_datasets(config.data, config.model.vocab_size, config.model.max_seq_len)
    batch = torch.stack([validation[i] for i in validation_positions(len(validation), 4)])[:, :-1]
    with torch.no_grad(), NormRecorder(model, max_points=3000) as recorder:
        model(batch)
    plot_s_curves(recorder.records, path,
                  title=f"{run.norm} model: norm input vs output before the affine (validation text)")


def write_report(args, runs: list[Run], held_out: list[str], corpus: str, notes: Sequence[str] = ()) -> Path:
    """``notes``: lines said of the whole comparison, each a paragraph above the table."""
    out = args.out
    model = SPEC.models[0]
    summaries = {run.point: SPEC.summarize(run) for run in runs}
    cells = cells_of(summaries)
    baseline = baseline_norm(args, model)
    main = SPEC.metrics[0]
    values = {cell: {m.key: [s[m.key] for p, s in summaries.items() if p.cell == cell] for m in SPEC.metrics}
              for cell in cells}
    swept = any(sweep for _, _, sweep in cells)
    lines = [
        "# LLaMA: RMSNorm vs DyT",
        "",
        f"Config `{shown_path(args.config)}` with {args.nproc} rank(s) under `{args.launcher}`; seeds "
        f"{sorted({r.seed for r in runs})}; text: {corpus}. Validation: whole documents held out of training: "
        f"{', '.join(held_out)}{validation_share(summaries.values(), 'windows')}.",
        "",
        *settings_notes(args, notes),
        "| norm |" + (" sweep point |" if swept else "") + " final train loss | validation loss | validation perplexity "
        f"| {SPEC.throughput_unit} | peak RSS per rank (MB) | wall time (s) | verdict ({main.title}, vs {baseline}) |",
        "|---|" + ("---|" if swept else "") + "---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        mine = [s for p, s in summaries.items() if p.cell == cell]
        # mean over the seeds that logged it (a diverged run stops before the last step logs it)
        rss = " / ".join(f"{statistics.mean(v):.0f}" for v in zip(*(m["peak_rss_mb"] for m in mine if m["peak_rss_mb"]))) or "-"
        judged = judge(cell, {c: values[c][main.key] for c in cells}, baseline, higher_is_better=main.higher_is_better,
                       tuned=tuned_keys(args))
        lines.append(
            f"| {cell[1]} |" + (f" {describe_sweep(cell[2])} |" if swept else "")
            + f" {mean_std([m['final_train_loss'] for m in mine])} | {mean_std([m['eval_loss'] for m in mine])} "
            f"| {mean_std([m['eval_perplexity'] for m in mine], 1)} | {mean_std([m['throughput'] for m in mine], 0)} "
            f"| {rss} | {mean_std([m['wall_s'] for m in mine], 0)} | {judged} |"
        )
    lines += ["", *divergence_notes(runs), *sweep_section(out, model, values, SPEC.metrics, args.sweeps)]
    plot_losses(runs, out / "loss_curves.png", "cross-entropy (nats/token)")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    if plot_alphas_of_first([r for r in runs if r.norm != baseline], out / "dyt_alpha.png"):
        lines += ["![DyT alpha and 1/std of its input per layer](dyt_alpha.png)", ""]
    normalised = next((r for r in runs if r.norm == baseline and r.diverged is None
                       and run_config(r).model.norm.kind in ("rmsnorm", "layernorm")), None)
    if normalised is not None:
        plot_s_curves(normalised, out / f"{baseline}_s_curves.png")
        lines += [f"![{baseline} S-curves]({baseline}_s_curves.png)", "",
                  "Each point: one element of a norm layer's input and its output before the per-channel weight and "
                  "bias (as the paper's Fig. 2), on validation text.", ""]
    write_json(out / "summary.json", [{**r.point.to_json(), **summaries[r.point],  # a diverged run's numbers: null
                                       **{m.key: summaries[r.point][m.key] for m in SPEC.metrics}} for r in runs],
               strict=True)
    report = out / "report.md"
    write_text_whole(report, "\n".join(lines))  # after summary.json; a kill leaves the old report whole
    return report


@user_errors("dyt-llama-compare")
def main(argv: list[str] | None = None) -> Path:
    parser = CommandParser(prog="dyt-llama-compare", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=user_path, default=SPEC.config_path(),
                        help="default: the tiny config shipped with dyt_llama (recipes/llama/tiny.yaml)")
    parser.add_argument("--seeds", action=DistinctValues, nargs="+", type=SEED.arg(int), default=[0],
                        help="seeds: model init and data order, one run each per norm (default 0)")
    add_run_arguments(parser, SPEC)
    args = parse_run_arguments(parser, argv)

    plan = plan_runs(SPEC, args, [(SPEC.models[0], args.config)], args.seeds)  # config errors before any launch
    for data in {repr((p.config.data, p.config.model.vocab_size, p.config.model.max_seq_len)): p.config
                 for p in plan}.values():
        build_datasets(data.data, data.model.vocab_size, data.model.max_seq_len)  # data errors; warms the cache
    held_out = list(load_documents(plan[0].config.data)["validation"]["title"])
    prepare_out(args)
    corpus = plan[0].config.data.corpus
    report = write_report(args, train_runs(SPEC, args, plan), held_out,
                          f"your corpus `{corpus}`" if corpus else "the built-in corpus (Shakespeare and Austen)",
                          [rows_with(plan, lambda config: config.model.scales_embedding(),
                                     "Learnable sqrt(dim) scalar after the embedding (`model.embedding_scale`)")])
    print(f"\nreport: {report}")
    return report


cli = command("dyt-llama-compare", main)
"""The console script (exit status 0 on success, 2 on bad input)."""

if __name__ == "__main__":
    raise SystemExit(cli())
