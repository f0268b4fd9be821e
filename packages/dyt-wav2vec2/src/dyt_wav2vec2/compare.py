"""Pretrain the same wav2vec 2.0 config with LayerNorm and with DyT (same seed, same audio), run
the downstream speech evals on both checkpoints over several seeds, and write ``report.md``
(tables in mean ± std, confusion matrices, WER, loss curves, DyT alpha per layer).

    dyt-wav2vec2-compare --out runs/wav2vec2-compare --nproc 2

Finished pretraining runs resume and finished evals are reused, so a killed comparison continues.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from dyt.analysis import pyplot
from dyt.errors import command
from dyt.train import load_config
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

from .eval import headline, run_evals
from .speech import KEYWORDS, build
from .task import Wav2Vec2PretrainConfig, Wav2Vec2PretrainTask, collapse_reason

NORMS = ("layernorm", "dyt")
EVAL_NAMES = {"contrastive": "pretraining task, held out", "probe": "keywords, linear probe",
              "finetune": "keywords, full fine-tune", "ctc": "CTC speech recognition"}
METRIC_NAMES = {"contrastive_accuracy": "contrastive accuracy", "contrastive_kept": "contrastive loss",
                "accuracy": f"accuracy ({len(KEYWORDS)} classes)", "cer": "character error rate",
                "wer": "word error rate"}
INITS = {True: "pretrained", False: "random init"}
"""Every downstream eval runs on the pretrained model and on the same model untrained."""


def plot_confusion(matrix: list[list[int]], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(KEYWORDS)), KEYWORDS, rotation=90, fontsize=5)
    ax.set_yticks(range(len(KEYWORDS)), KEYWORDS, fontsize=5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("spoken")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _steps_per_second(train_rows: list[dict]) -> str:
    seconds = [r["step_seconds"] for r in train_rows[1:] if "step_seconds" in r]  # the first includes warm-up
    return f"{1 / statistics.median(seconds):.2f}" if seconds else "-"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="dyt-wav2vec2-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("recipes/wav2vec2/tiny.yaml"))
    parser.add_argument("--evals", nargs="+", choices=list(EVAL_NAMES), default=["contrastive", "probe", "finetune", "ctc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="downstream seeds")
    parser.add_argument("--steps", type=int, default=150, help="downstream fine-tuning steps per seed")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    add_run_arguments(parser, out="runs/wav2vec2-compare")
    args = parse_run_arguments(parser, argv)

    config = load_config(Wav2Vec2PretrainConfig, args.config, args.overrides)  # config errors before launching
    data = build(per_split={"train": config.data.builtin_sentences, "validation": 200, "test": 200})
    Wav2Vec2PretrainTask(config)  # the runs' own audio checks (and thresholds), before launching
    prepare_out(args)
    runs, evals = [], {}
    for norm in NORMS:
        run = run_training("dyt_wav2vec2.train", args.config, args.out / norm, [*args.overrides, f"model.norm.kind={norm}"],
                           label=norm, seed=args.pretrain_seed, launcher=args.launcher, nproc=args.nproc)
        runs.append(run)
        for pretrained, init in INITS.items():
            print(f"== downstream evals of {norm} ({init}): {', '.join(args.evals)}; seeds {args.seeds}", flush=True)
            settings = {"evals": args.evals, "seeds": args.seeds, "steps": args.steps, "pretrained": pretrained}
            evals[norm, init] = reuse_or_compute(
                run.dir / ("evals.json" if pretrained else "evals-random-init.json"), settings,
                lambda run=run, pretrained=pretrained: run_evals(run.dir, data, args.evals, args.seeds, args.steps,
                                                                 pretrained=pretrained))
    report = write_report(args, runs, evals)
    print(f"\nreport: {report}")
    return report


def write_report(args, runs: list[Run], evals: dict) -> Path:
    out = args.out
    model = load_config(Wav2Vec2PretrainConfig, args.config, args.overrides).model
    lines = [
        "# wav2vec 2.0: LayerNorm vs DyT",
        "",
        f"Config `{args.config}`, {args.nproc} rank(s) under `{args.launcher}`, pretraining seed {args.pretrain_seed}. "
        "Validation: synthetic sentences in voices never heard in training, masked and with distractors "
        f"sampled as in training. Contrastive loss over all 1 + {model.distractors} candidates (chance "
        f"ln {model.distractors + 1} = {math.log(model.distractors + 1):.3f}): a distractor equal to its target "
        "counts as a tie, where fairseq2's training loss drops it. Accuracy: how often the target ranks first, "
        f"ties with such duplicates broken at random (chance 1/{model.distractors + 1}). Perplexity of {model.codebooks * model.codebook_entries} "
        "codes. **Collapsed**: codebook perplexity >= 95% of its maximum, or accuracy under twice chance.",
        "",
        "| norm | final train loss | validation contrastive | contrastive accuracy | codebook perplexity "
        "| distractors equal to target | status | steps/s | audio s / s | peak RSS per rank (MB) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        rows = run.metrics
        train = [r for r in rows if "train/loss" in r]
        last_eval = [r for r in rows if "eval/loss" in r][-1]
        reason = collapse_reason(last_eval, model)
        rss = " / ".join(f"{v:.0f}" for v in peak_rss_per_rank(rows[-1]))
        lines.append(f"| {run.label} | {statistics.mean(r['train/loss'] for r in train[-3:]):.3f} | "
                     f"{last_eval['eval/contrastive_kept']:.3f} | {last_eval['eval/contrastive_accuracy']:.3f} | "
                     f"{last_eval['eval/codebook_perplexity']:.1f} | {last_eval['eval/distractors_equal_target']:.1%} | "
                     f"{f'**collapsed** ({reason})' if reason else 'learning'} | {_steps_per_second(train)} | "
                     f"{median_throughput(rows):.1f} | {rss} | {run.wall_s:.0f} |")
    lines += ["", f"Downstream, seeds {args.seeds} ({args.steps} steps each, best validation checkpoint): mean ± std. "
              "Each eval also runs on the same model untrained (random init, same seeds and budget): what "
              "pretraining bought is the gap to that row.", "",
              "| norm | model | eval | metric | unseen voices | real recordings |", "|---|---|---|---|---|---|"]
    summary = {}
    for (norm, init), results in evals.items():
        for name, rows in results.items():
            for metric, cells in headline(name, rows).items():
                summary[f"{norm}/{init}/{name}/{metric}"] = cells
                lines.append(f"| {norm} | {init} | {EVAL_NAMES[name]} | {METRIC_NAMES[metric]} | "
                             f"{mean_std(cells['unseen voices'])} | {mean_std(cells['real recordings'])} |")
    lines.append("")
    plot_losses(runs, out / "loss_curves.png", "wav2vec 2.0 loss per masked frame")
    lines += ["![pretraining loss curves](loss_curves.png)", ""]
    for run in runs:
        if plot_alphas(run, out / "dyt_alpha.png"):
            lines += ["![DyT alpha per layer](dyt_alpha.png)", ""]
    for (norm, init), results in evals.items():
        if init != INITS[True]:
            continue
        best = next((results[n] for n in ("finetune", "probe") if n in results), None)
        if best:
            plot_confusion(best[0]["confusion"]["real recordings"], out / f"confusion_{norm}.png",
                           f"{norm}: keywords on real recordings (seed {best[0]['seed']})")
            lines += [f"![{norm} confusion matrix](confusion_{norm}.png)", ""]
        if "ctc" in results:
            lines += [f"CTC examples ({norm}, seed {results['ctc'][0]['seed']}, real recordings): reference → hypothesis", ""]
            lines += [f"- `{ref}` → `{hyp}`" for ref, hyp in results["ctc"][0]["examples"]["real recordings"]]
            lines.append("")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


cli = command("dyt-wav2vec2-compare", main)
"""The console script (exit status 0 on success, 2 on bad input)."""

if __name__ == "__main__":
    raise SystemExit(cli())
