"""Pretrain the same wav2vec 2.0 config with LayerNorm and with DyT (same seed, same audio;
optionally over a sweep grid), run the downstream speech evals on every checkpoint over several
seeds, and write ``report.md`` (tables in mean ± std with a verdict per row, sweep tables and
heatmaps, confusion matrices, WER, loss curves, DyT alpha per layer).

    dyt-wav2vec2-compare --out runs/wav2vec2-compare --nproc 2 [--sweep KEY=V1,V2 ...]

Finished pretraining runs are not launched again, unfinished ones resume, and finished evals are
reused, so a killed comparison continues. A run whose training loss goes NaN or infinite is reported as
diverged (no verdict on its cells) and the comparison goes on.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dyt.analysis import pyplot
from dyt.errors import (
    CommandParser,
    DistinctValues,
    command,
    help_description,
    options_given,
    user_errors,
    user_path,
)
from dyt.train import load_config
from dyt.train.cli import add_device_argument
from dyt.train.compare import (
    INITS,
    Run,
    add_pretrain_seeds_argument,
    add_run_arguments,
    baseline_norm,
    cells_of,
    checkpoint_setting,
    describe_sweep,
    divergence_notes,
    downstream_evals,
    downstream_values,
    judge,
    mean_std,
    parse_run_arguments,
    plan_runs,
    plot_alphas_of_first,
    plot_losses,
    prepare_out,
    pretraining_gain,
    pretrainings_note,
    settings_notes,
    shown_path,
    stored_eval,
    sweep_section,
    train_runs,
    tuned_keys,
    validation_share,
)
from dyt.train.config import SEED, override_keys
from dyt.train.jsonio import write_json, write_text_whole
from dyt.train.recipe import Metric

from .audio import AudioError
from .eval import (
    EVALS,
    CTCSettings,
    add_ctc_arguments,
    add_keyword_arguments,
    check_eval_options,
    eval_results,
    eval_settings,
    headline,
    resolve_ctc_budget,
)
from .recipe import SPEC
from .speech import KEYWORDS, speech_identity
from .task import SpeechDataConfig, Wav2Vec2PretrainTask, builtin_speech

NO_EVALS = "none"
"""``--evals none``: compare pretraining alone (no built-in speech needed with your own audio)."""
EVAL_NAMES = {"contrastive": "pretraining task, held out", "probe": "keywords, linear probe",
              "finetune": "keywords, full fine-tune", "ctc": "CTC speech recognition"}
METRIC_NAMES = {"contrastive_accuracy": "contrastive accuracy", "contrastive_kept": "contrastive loss",
                "accuracy": f"accuracy ({len(KEYWORDS)} classes)", "cer": "character error rate",
                "wer": "word error rate"}
HIGHER_IS_BETTER = {"contrastive_accuracy": True, "contrastive_kept": False, "accuracy": True, "cer": False,
                    "wer": False}
TESTS = ("unseen voices", "real recordings")


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


@user_errors("dyt-wav2vec2-compare")
def main(argv: list[str] | None = None) -> Path:
    parser = CommandParser(prog="dyt-wav2vec2-compare", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=user_path, default=SPEC.config_path(),
                        help="default: the tiny config shipped with dyt_wav2vec2 (recipes/wav2vec2/tiny.yaml)")
    parser.add_argument("--evals", action=DistinctValues, nargs="+", choices=[*EVAL_NAMES, NO_EVALS],
                        default=list(EVALS),
                        help="downstream evals, on the built-in speech (default: all four); none: compare "
                             "pretraining alone (your own audio with no built-in speech on this machine)")
    keyword_options, ctc_options = add_keyword_arguments(parser), add_ctc_arguments(parser)
    eval_options = [  # what --evals none refuses: it runs no eval for them to set
        parser.add_argument("--seeds", action=DistinctValues, nargs="+", type=SEED.arg(int), default=[0, 1, 2],
                            help="downstream seeds (default 0 1 2)"), add_device_argument(parser),
        *keyword_options, *ctc_options]
    add_pretrain_seeds_argument(parser)
    add_run_arguments(parser, SPEC)
    args = parse_run_arguments(parser, argv)
    if NO_EVALS in args.evals:
        if len(args.evals) > 1:
            parser.error(f"--evals {NO_EVALS} runs no eval: give it alone")
        if given := options_given(parser, argv, eval_options):
            parser.error(f"{', '.join(given)} set the downstream evals, and --evals {NO_EVALS} runs none: drop them")
        args.evals = []
    else:
        check_eval_options(parser, argv, args, keyword_options, ctc_options)
    # one order whatever the command line's: stored evals are reused by their settings, so that
    # --seeds 1 0 finds what --seeds 0 1 stored
    args.evals, args.seeds = [e for e in EVALS if e in args.evals], sorted(args.seeds)

    plan = plan_runs(SPEC, args, [(SPEC.models[0], args.config)], args.pretrain_seeds)  # config errors first
    set_eval = any(key.split(".")[0] == "eval" for key in override_keys(args.overrides))
    budget = resolve_ctc_budget(args, plan[0].config.eval, args.config, f"{args.config} and --set" if set_eval else None)
    if "ctc" in args.evals:
        print(budget, flush=True)
    if args.evals:  # built (or found) before any training: a speech error stops the compare first
        eval_speech(plan[0].config.data)
    for checked in {repr(p.config.data): p.config for p in plan}.values():
        Wav2Vec2PretrainTask(checked)  # the runs' own audio checks (and thresholds), before launching
    prepare_out(args)
    runs = train_runs(SPEC, args, plan)
    ctc = CTCSettings(steps=args.ctc_steps, lr=args.ctc_lr, schedule=args.ctc_schedule)

    def evaluate(run: Run, pretrained: bool) -> dict:
        """Eval name -> one result per seed, each stored in the run's ``eval-<name>.json`` as it is done."""
        print(f"== downstream evals of {run.label} ({INITS[pretrained]}): {', '.join(args.evals)}; seeds {args.seeds}; "
              f"on {args.device}", flush=True)
        # asked again: a sweep of data.builtin_sentences rebuilt the folder at each run's size
        speech = eval_speech(plan[0].config.data)
        common = {"pretrained": pretrained, **checkpoint_setting(run, pretrained), "speech": speech_identity(speech)}
        return {name: stored_eval(run, f"eval-{name}", pretrained, {**common, **eval_settings(name, args.steps, ctc)},
                                  args.seeds, lambda missing, name=name: eval_results(
                                      name, run.dir, speech, missing, args.steps, ctc, pretrained, args.device), args.device)
                for name in args.evals}

    report = write_report(args, runs, downstream_evals(runs, evaluate) if args.evals else {})
    print(f"\nreport: {report}")
    return report


def eval_speech(data: SpeechDataConfig) -> Path:
    """The built-in speech the downstream evals run on (held-out voices, keywords, real recordings),
    whatever audio pretraining reads; where it cannot be built and the runs pretrain on your own
    audio, the error says that ``--evals none`` compares pretraining without it."""
    try:
        return builtin_speech(data)
    except AudioError as error:
        if not data.train_manifest:
            raise
        raise AudioError(f"the downstream evals run on the built-in speech, whatever audio pretraining reads: {error}; "
                         f"or give --evals {NO_EVALS} to compare pretraining alone") from None


def chance_levels(built: set[tuple[int, int]]) -> str:
    """The report's words on the contrastive task's chance levels and the codebook, for the
    (distractors, codes) of the models its runs built: one pair, or several where a sweep changed them."""
    tie = ("a distractor equal to its target counts as a tie, where fairseq2's training loss drops it. Accuracy: how "
           "often the target ranks first, ties with such duplicates broken at random")
    if len(built) == 1:
        ((distractors, codes),) = built
        return (f"Contrastive loss over all 1 + {distractors} candidates (chance ln {distractors + 1} = "
                f"{math.log(distractors + 1):.3f}): {tie} (chance 1/{distractors + 1}). Perplexity of {codes} codes.")
    listed = "; ".join(f"{d} distractors (chance ln {d + 1} = {math.log(d + 1):.3f}, 1/{d + 1}), {c} codes"
                       for d, c in sorted(built))
    return (f"Contrastive loss over all 1 + K candidates, K the run's distractors: {tie}. The runs' models differ "
            f"(a sweep): {listed}.")


def downstream_metric(name: str, metric: str, test: str) -> Metric:
    return Metric(f"{name}/{metric}/{test}", f"{EVAL_NAMES[name]}, {METRIC_NAMES[metric]}, {test}",
                  higher_is_better=HIGHER_IS_BETTER[metric], test=True)


def write_report(args, runs: list[Run], evals: dict) -> Path:
    """``evals[(run.point, pretrained)]``: that run's downstream results (eval name -> one result per
    seed), as :func:`~dyt.train.compare.downstream_evals` makes them; None for a diverged pretraining
    run (no model to evaluate: its values are NaN for every pretrained eval the other runs made)."""
    out = args.out
    config = load_config(SPEC.config_class, args.config, args.overrides)
    data = config.data
    # the header's chance levels and codebook size from the models the runs built (a sweep may change them)
    built = {(m.distractors, m.codebooks * m.codebook_entries) for m in (
        load_config(SPEC.config_class, run.dir / "config.yaml", check_files=False).model for run in runs
        if (run.dir / "config.yaml").is_file())} or {(config.model.distractors,
                                                      config.model.codebooks * config.model.codebook_entries)}
    validation = (f"your held-out audio `{data.validation_manifest}` (training: `{data.train_manifest}`)"
                  if data.train_manifest else "synthetic sentences in voices never heard in training")
    summaries = {run.point: SPEC.summarize(run) for run in runs}
    cells = cells_of(summaries)
    baseline = baseline_norm(args, SPEC.models[0])
    swept = any(sweep for _, _, sweep in cells)
    point_column, point_rule = (" sweep point |", "---|") if swept else ("", "")

    main = SPEC.metrics[0]
    main_values = {cell: [summaries[p][main.key] for p in summaries if p.cell == cell] for cell in cells}

    collapsed: dict = {}  # cell -> the seeds of its pretraining runs that collapsed
    for point, s in summaries.items():
        if s["collapse"]:
            collapsed.setdefault(point.cell, []).append(point.seed)

    def judged(cell, numbers: dict, higher_is_better: bool, pretrainings: int | None = None,
               pretrained: bool = True) -> str:
        """Several baseline points (a NORM: sweep of the baseline) are chosen between by the main
        (validation) metric, never by a test number. A pretrained model's row gets no verdict where
        the baseline cell it is judged against has a collapsed pretraining run: that seed's numbers
        stretch the baseline's mean ± 2σ until anything is "within" it. A collapse in the judged
        cell itself only moves its mean (the band is the baseline's): its verdict stands, noted."""
        def collapsed_baseline(reference) -> str | None:
            if reference in collapsed:
                return f"no verdict: collapsed pretraining ({reference[1]} seed {', '.join(map(str, collapsed[reference]))})"
            return None

        words = judge(cell, numbers, baseline, higher_is_better=higher_is_better, choose_by=main_values,
                      choose_higher=main.higher_is_better, pretrainings=pretrainings,
                      withheld=collapsed_baseline if pretrained else None, tuned=tuned_keys(args))
        if pretrained and cell in collapsed and cell[1] != baseline and pretrainings != 1:
            return f"{words} ({cell[1]} seed {', '.join(map(str, collapsed[cell]))} collapsed)"
        return words
    lines = [
        "# wav2vec 2.0: LayerNorm vs DyT",
        "",
        f"Config `{shown_path(args.config)}`, {args.nproc} rank(s) under `{args.launcher}`, pretraining seed(s) "
        f"{', '.join(map(str, args.pretrain_seeds))}. "
        f"Validation: {validation}{validation_share(summaries.values(), 'utterances')}, masked and with distractors "
        f"sampled as in training. {chance_levels(built)} **Collapsed**: codebook perplexity >= 95% of its "
        "maximum, or accuracy under twice chance (each run's own); "
        "a pretrained row gets no verdict where the baseline has a collapsed pretraining run "
        "(that seed's numbers would stretch its mean ± 2σ); a row's own collapsed runs are named beside its verdict.",
        "",
        *settings_notes(args),
        f"| norm |{point_column} seed | final train loss | validation contrastive | contrastive accuracy | codebook perplexity "
        f"| distractors equal to target | status | steps/s | {SPEC.throughput_unit} | peak RSS per rank (MB) | wall time (s) "
        f"| verdict ({main.title}) |",
        f"|---|{point_rule}---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for point, s in summaries.items():
        rss = " / ".join(f"{v:.0f}" for v in s["peak_rss_mb"]) or "-"
        steps_per_s = "-" if s["steps_per_s"] is None else f"{s['steps_per_s']:.2f}"
        status = (f"**diverged** at step {s['diverged_at']}" if "diverged_at" in s
                  else f"**collapsed** ({s['collapse']})" if s["collapse"] else "learning")
        lines.append(f"| {point.norm} |" + (f" {describe_sweep(point.sweep)} |" if swept else "")
                     + f" {point.seed} | {s['final_train_loss']:.3f} | "
                     f"{s['eval_contrastive_kept']:.3f} | {s['eval_contrastive_accuracy']:.3f} | "
                     f"{s['eval_codebook_perplexity']:.1f} | {s['eval_distractors_equal_target']:.1%} | "
                     f"{status} | {steps_per_s} | "
                     f"{s['throughput']:.1f} | {rss} | {s['wall_s']:.0f} | "
                     f"{judged(point.cell, main_values, main.higher_is_better)} |")
    lines += ["", *divergence_notes(runs)]
    budget = f"{args.steps} steps each" + (f", CTC {args.ctc_steps} at peak lr {args.ctc_lr:g}, {args.ctc_schedule}"
                                           if "ctc" in args.evals else "")
    downstream_header = [
        "", f"Downstream, seeds {args.seeds} ({budget}, best validation checkpoint): mean ± std. "
        "Each eval also runs on the same model untrained (random init, same seeds and budget): what "
        "pretraining bought is the gap to that row, given for each pretrained row (its mean minus the "
        "random-init mean, against the random-init runs' ± 2σ). Verdicts: each test set's mean against the "
        "baseline norm's mean ± 2σ over seeds, same eval and init. " + pretrainings_note(args.pretrain_seeds), "",
        f"| norm |{point_column} init | eval | metric | unseen voices | real recordings "
        "| verdict (unseen voices) | verdict (real recordings) | pretrained − random init (unseen voices) "
        "| pretrained − random init (real recordings) |",
        f"|---|{point_rule}---|---|---|---|---|---|---|---|---|"]
    lines += downstream_header if args.evals else ["", f"No downstream evals (`--evals {NO_EVALS}`).", ""]
    table_rows = {}  # (cell, pretrained, eval, metric), in the order of the runs
    summary = []  # one row per run, init, eval and metric: its values per test set, facts in fields of their own
    headlines = {key: None if results is None else {name: headline(name, rows) for name, rows in results.items()}
                 for key, results in evals.items()}  # (point, pretrained) -> eval -> metric -> test set -> values
    made = list(dict.fromkeys((name, metric) for (_, pretrained), evals_made in headlines.items()
                              if evals_made and pretrained for name, per_metric in evals_made.items()
                              for metric in per_metric))
    for (point, pretrained), evals_made in headlines.items():
        for name, metric in made if evals_made is None else []:  # a diverged pretraining: NaN values
            summary.append({**point.to_json(), "init": INITS[pretrained], "eval": name, "metric": metric,
                            "diverged_at": summaries[point]["diverged_at"], **{test: None for test in TESTS}})
            table_rows[point.cell, pretrained, name, metric] = None
        for name, per_metric in (evals_made or {}).items():
            for metric, per_test in per_metric.items():
                summary.append({**point.to_json(), "init": INITS[pretrained], "eval": name, "metric": metric,
                                **per_test})
                table_rows[point.cell, pretrained, name, metric] = None

    def per_cell(pretrained: bool, name: str, metric: str, test: str) -> dict:
        return downstream_values(headlines, pretrained, lambda result: result[name][metric][test], args.seeds)

    downstream = {(*key, test): per_cell(*key, test) for key in dict.fromkeys(row[1:] for row in table_rows)
                  for test in TESTS}  # (pretrained, eval, metric, test) -> cell -> its values
    for cell, pretrained, name, metric in table_rows:
        mine = [downstream[pretrained, name, metric, test][cell] for test in TESTS]
        pretrainings = len(args.pretrain_seeds) if pretrained else None
        judgements = [judged(cell, downstream[pretrained, name, metric, test], HIGHER_IS_BETTER[metric], pretrainings,
                             pretrained=pretrained) for test in TESTS]
        judgements += ["-" if not pretrained else pretraining_gain(
            values, downstream[False, name, metric, test][cell], higher_is_better=HIGHER_IS_BETTER[metric])
            for values, test in zip(mine, TESTS)]
        lines.append(f"| {cell[1]} |" + (f" {describe_sweep(cell[2])} |" if swept else "")
                     + f" {INITS[pretrained]} | {EVAL_NAMES[name]} | {METRIC_NAMES[metric]} | "
                     + " | ".join(mean_std(values) for values in mine) + " | " + " | ".join(judgements) + " |")
    if args.evals:
        lines.append("")
    values = {cell: {m.key: main_values[cell] if m is main else [summaries[p][m.key] for p in summaries if p.cell == cell]
                     for m in SPEC.metrics} for cell in cells}
    metrics = list(SPEC.metrics)
    for (pretrained, name, metric, test), numbers_of in downstream.items():
        if pretrained:
            metrics.append(downstream_metric(name, metric, test))
            for cell, numbers in numbers_of.items():
                values[cell][metrics[-1].key] = numbers
    lines += sweep_section(out, SPEC.models[0], values, metrics, args.sweeps)
    plot_losses(runs, out / "loss_curves.png", "wav2vec 2.0 loss per masked frame")
    lines += ["![pretraining loss curves](loss_curves.png)", "",
              "The curves (and the final train loss column) are fairseq2's loss, which drops distractors equal to "
              "their target: a collapsed run's can lie below a learning one's. Judge by the validation contrastive "
              "loss with duplicates kept, the accuracy and the status column.", ""]
    if plot_alphas_of_first([r for r in runs if r.norm != baseline], out / "dyt_alpha.png"):
        lines += ["![DyT alpha and 1/std of its input per layer](dyt_alpha.png)", ""]
    shown = set()  # a confusion matrix and CTC examples for the first point of each norm
    for (point, pretrained), results in evals.items():
        if not pretrained or point.norm in shown or results is None:
            continue
        shown.add(point.norm)
        norm = point.norm
        best = next((results[n] for n in ("finetune", "probe") if n in results), None)
        if best:
            plot_confusion(best[0]["details"]["real recordings"], out / f"confusion_{norm}.png",
                           f"{point.label}: keywords on real recordings (seed {best[0]['seed']})")
            lines += [f"![{norm} confusion matrix](confusion_{norm}.png)", ""]
        if "ctc" in results:
            lines += [f"CTC examples ({point.label}, seed {results['ctc'][0]['seed']}, real recordings): "
                      "reference → hypothesis", ""]
            lines += [f"- `{ref}` → `{hyp}`" for ref, hyp in results["ctc"][0]["details"]["real recordings"]]
            lines.append("")
    write_json(out / "summary.json", summary, strict=True)
    report = out / "report.md"
    write_text_whole(report, "\n".join(lines))  # after summary.json; a kill leaves the old report whole
    return report


cli = command("dyt-wav2vec2-compare", main)
"""The console script (exit status 0 on success, 2 on bad input)."""

if __name__ == "__main__":
    raise SystemExit(cli())
