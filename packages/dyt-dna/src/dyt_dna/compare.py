"""Pretrain HyenaDNA (LayerNorm vs DyT) and Caduceus (RMSNorm vs DyT) on the same data with the
same seed (optionally over a sweep grid), fine-tune every checkpoint on DNA classification tasks over
several seeds, and write ``report.md`` (tables in mean ± std with a verdict per row, sweep tables and
heatmaps, loss curves, DyT alpha per layer).

    dyt-dna-compare --out runs/dna-compare --nproc 2 [--sweep KEY=V1,V2 ...]

Finished pretraining runs are not launched again, unfinished ones resume, and finished evals are
reused, so a killed comparison continues. A run whose training loss goes NaN or infinite is reported as
diverged (no verdict on its cells) and the comparison goes on.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from dyt.errors import CommandParser, DistinctValues, help_description, user_path
from dyt.train import command, load_config, user_errors
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
    rows_with,
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
from dyt.train.trainer import check_one_step_of_data

from .data import BUILTIN_TASKS, ClassificationData, check_task, load_task, pretraining_datasets
from .eval import (
    add_finetune_arguments,
    check_builtin_options,
    eval_window_error,
    evaluate,
    finetune_for,
    finetune_seeds,
    finetune_settings,
    result_row,
    task_signature,
)
from .recipe import SPEC
from .task import DnaConfig

FINETUNE_METRICS = {"accuracy": "accuracy", "mcc": "MCC", "f1": "F1 (macro)"}


def accuracy_metric(task: str) -> Metric:
    """The downstream number sweeps chart and verdicts judge: test accuracy from the pretrained model."""
    return Metric(f"{task}/accuracy", f"{task} test accuracy (pretrained)", higher_is_better=True, test=True)


@user_errors("dyt-dna-compare")
def main(argv: list[str] | None = None) -> Path:
    parser = CommandParser(prog="dyt-dna-compare", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=user_path, nargs="+", default=[SPEC.config_path(m) for m in SPEC.models],
                        help="default: the tiny HyenaDNA and Caduceus configs shipped with dyt_dna")
    parser.add_argument("--tasks", action=DistinctValues, nargs="+", default=["species"],
                        help=f"built-in tasks ({', '.join(BUILTIN_TASKS)}) or task folders (docs/dna.md); "
                             "default species")
    parser.add_argument("--seeds", action=DistinctValues, nargs="+", type=SEED.arg(int), default=[0, 1, 2], help="fine-tuning seeds (default 0 1 2)")
    add_pretrain_seeds_argument(parser)
    builtin_only = add_finetune_arguments(parser)
    add_run_arguments(parser, SPEC)
    args = parse_run_arguments(parser, argv)
    check_builtin_options(parser, argv, args.tasks, builtin_only)
    args.seeds = finetune_seeds(args)  # one order for the stored evals, the report and summary.json
    for option, keys in (("--sweep", [s.key for s in args.sweeps]), ("--set", override_keys(args.overrides))):
        if "model.arch" in keys:  # runs are named, grouped and judged by their config's model
            parser.error(f"argument {option}: model.arch is the model each --configs file builds (runs are named "
                         "and judged by it): give one config per model, e.g. --configs recipes/dna/hyena-tiny.yaml "
                         "recipes/dna/caduceus-tiny.yaml")

    # Each config's model.arch says which of the recipe's models it is (and so its default norms).
    models = [(SPEC.model(load_config(DnaConfig, path, args.overrides).model.arch), path) for path in args.configs]
    for (first, first_path), (second, second_path) in itertools.combinations(models, 2):
        if first.name == second.name:  # runs are named and reported by model
            parser.error(f"argument --configs: {first_path} and {second_path} are both {first.name} models; "
                         "give one config per model (compare sizes in separate --out folders)")
    plan = plan_runs(SPEC, args, models, args.pretrain_seeds)  # config errors before launching
    if error := eval_window_error(args.eval_window, args.tasks, min(p.config.model.max_len for p in plan)):
        parser.error(error)
    for spec in args.tasks:
        check_task(spec)
    for first, second in itertools.combinations(args.tasks, 2):
        if Path(first).name == Path(second).name:  # results are stored and reported by task name
            parser.error(f"argument --tasks: {first} and {second} are both named {Path(first).name!r}")
    # the tasks first: their files are small and a bad one stops the command before the pretraining
    # data is built; each model's context is checked against them as the fine-tuning will read them
    tasks = [load_task(spec, args.eval_window, args.per_class) for spec in args.tasks]
    for task, max_len in ((t, m) for t in tasks for m in sorted({p.config.model.max_len for p in plan})):
        task.check_length(max_len, truncate=None)
    for data, max_len in {repr((p.config.data, p.config.model.max_len)): (p.config.data, p.config.model.max_len)
                          for p in plan}.values():
        train, _ = pretraining_datasets(data, max_len)  # data errors early; warms the cache
        for planned in (p for p in plan if p.config.data == data and p.config.model.max_len == max_len):
            train_cfg = planned.config.train.for_world(args.nproc)
            check_one_step_of_data(len(train), train_cfg.micro_batch_size, args.nproc, train_cfg.grad_accum)
    finetune_cfg = finetune_settings(args)
    # each task validates VALIDATIONS times over the steps it will take, as python -m dyt_dna.eval does
    task_cfgs = {task.name: finetune_for(finetune_cfg, len(task.train)) for task in tasks}
    task_files = {task.name: task_signature(task, spec in BUILTIN_TASKS) for task, spec in zip(tasks, args.tasks, strict=True)}
    prepare_out(args)

    runs = train_runs(SPEC, args, plan)

    def fine_tune(run: Run, pretrained: bool) -> dict[str, list[dict]]:
        """Task name -> one result per seed."""
        results = {}
        for task in tasks:
            print(f"== fine-tune {run.point.model} {run.label} ({INITS[pretrained]}) on {task.name}, seeds {args.seeds}, "
                  f"on {args.device}", flush=True)
            cfg = task_cfgs[task.name]
            settings = {"finetune": asdict(cfg), "window": args.eval_window, "per_class": args.per_class,
                        "task_files": task_files[task.name], **checkpoint_setting(run, pretrained)}
            results[task.name] = stored_eval(
                run, f"eval-{task.name}", pretrained, settings, args.seeds,
                lambda missing, task=task, cfg=cfg: (result_row(task, r) for r in evaluate(
                    run.dir, task, cfg, missing, pretrained=pretrained, device=args.device)), args.device)
        return results

    evals = downstream_evals(runs, fine_tune)

    def listed(files) -> str:
        return ", ".join(f"`{f}`" for f in sorted(set(files)))

    train_fasta = [f for p in plan for f in p.config.data.fasta]
    validation = (f"your held-out FASTA files {listed(f for p in plan for f in p.config.data.validation_fasta)} "
                  f"(pretraining on your {listed(train_fasta)})" if train_fasta
                  else "held-out strains (never trained on, but near relatives of the training strains: 60-99% of "
                        "their 32-mers occur in them, docs/dna.md#data)")

    def title(model: str) -> str:
        return SPEC.model(model).title

    notes = [rows_with(plan, lambda config: config.model.scales_embedding(),
                       "Learnable sqrt(dim) scalar after the embedding (`model.embedding_scale`)", title),
             rows_with(plan, lambda config: config.model.ties_embeddings(),
                       "LM head tied to the embedding (`model.tied_embeddings`)", title)]
    report = write_report(args, runs, tasks, evals, validation, notes)
    print(f"\nreport: {report}")
    return report


def write_report(args, runs: list[Run], tasks: list[ClassificationData], evals, validation: str,
                 notes: Sequence[str] = ()) -> Path:
    """``evals[(run.point, pretrained)]``: that run's fine-tuning results (task name -> one result per
    seed), as :func:`~dyt.train.compare.downstream_evals` makes them (None for a diverged run);
    ``validation``: what the validation loss was measured on, in words; ``notes``: lines said of the
    whole comparison, each a paragraph above the table."""
    out = args.out
    summaries = {run.point: SPEC.summarize(run) for run in runs}
    cells = cells_of(summaries)
    metrics = (*SPEC.metrics, *(accuracy_metric(t.name) for t in tasks))

    def downstream(task: ClassificationData, pretrained: bool, metric: str = "accuracy") -> dict:
        """Cell -> its test values of ``metric`` on ``task``."""
        return downstream_values(evals, pretrained, lambda results: [r["test"]["test"][metric] for r in results[task.name]],
                                 args.seeds)

    values = {}  # cell -> metric key -> its values (pretraining: the pretraining seeds; downstream: over_pretrainings)
    for cell in cells:
        points = [p for p in summaries if p.cell == cell]
        values[cell] = {m.key: [summaries[p][m.key] for p in points] for m in SPEC.metrics}
    for task in tasks:
        for cell, numbers in downstream(task, True).items():
            values[cell][accuracy_metric(task.name).key] = numbers
    swept = any(sweep for _, _, sweep in cells)
    main = SPEC.metrics[0]
    main_values = {cell: values[cell][main.key] for cell in cells}

    def judged(cell, numbers: dict, metric: Metric, pretrainings: int | None = None) -> str:
        """Several baseline points (a NORM: sweep of the baseline) are chosen between by the main
        (validation) metric, never by a test number."""
        return judge(cell, numbers, baseline_norm(args, SPEC.model(cell[0])),
                     higher_is_better=metric.higher_is_better, digits=metric.digits,
                     choose_by=main_values, choose_higher=main.higher_is_better,
                     pretrainings=pretrainings, tuned=tuned_keys(args))

    point_column, point_rule = (" sweep point |", "---|") if swept else ("", "")
    lines = [
        f"# DNA: {' and '.join(dict.fromkeys(SPEC.model(cell[0]).title for cell in cells))}, published norm vs DyT",
        "",
        f"Pretraining: {args.nproc} rank(s) under `{args.launcher}`, seed(s) "
        f"{', '.join(map(str, args.pretrain_seeds))}, configs "
        f"{', '.join(f'`{shown_path(p)}`' for p in args.configs)}. Validation loss: {validation}"
        f"{validation_share(summaries.values(), 'windows')}.",
        "",
        *settings_notes(args, notes),
        f"| model | norm |{point_column} seed | final train loss | validation loss | validation perplexity | "
        f"{SPEC.throughput_unit} | peak RSS per rank (MB) | wall time (s) | verdict ({main.title}) |",
        f"|---|---|{point_rule}---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for point in (p for p in summaries if p.cell == cell):
            s = summaries[point]
            rss = " / ".join(f"{v:.0f}" for v in s["peak_rss_mb"]) or "-"
            lines.append(f"| {SPEC.model(cell[0]).title} | {cell[1]} |" + (f" {describe_sweep(cell[2])} |" if swept else "")
                         + f" {point.seed} | {s['final_train_loss']:.4f} | {s['eval_loss']:.4f} | {s['eval_perplexity']:.3f} "
                         f"| {s['throughput']:.0f} | {rss} | {s['wall_s']:.0f} | {judged(cell, main_values, main)} |")
    lines += [
        "",
        *divergence_notes(runs),
        f"Fine-tuning from each checkpoint (full model, pooled linear head, early stopping on validation MCC), "
        f"seeds {args.seeds}: test-split mean ± std. Each model is also fine-tuned untrained (random init, same "
        "seeds and budget): what pretraining bought is the gap to that row, given for each pretrained row "
        "(its accuracy's mean minus the random-init mean, against the random-init runs' ± 2σ). Verdict: the "
        "accuracy's mean against the baseline norm's mean ± 2σ over seeds, same init and task. "
        + pretrainings_note(args.pretrain_seeds),
        "",
        f"| model | norm |{point_column} init | task | accuracy | MCC | F1 (macro) | verdict (accuracy) "
        "| pretrained − random init (accuracy) |",
        f"|---|---|{point_rule}---|---|---|---|---|---|---|",
    ]
    summary = []
    accuracy = Metric("accuracy", "accuracy", higher_is_better=True, test=True)
    pretrainings = len(args.pretrain_seeds)
    for task, pretrained in ((t, p) for t in tasks for p in (True, False)):
        per_metric = {m: downstream(task, pretrained, m) for m in FINETUNE_METRICS}
        numbers = per_metric["accuracy"]
        untrained = numbers if not pretrained else downstream(task, False)
        for cell in cells:
            gain = ("-" if not pretrained else
                    pretraining_gain(numbers[cell], untrained[cell], higher_is_better=True))
            lines.append(f"| {SPEC.model(cell[0]).title} | {cell[1]} |" + (f" {describe_sweep(cell[2])} |" if swept else "")
                         + f" {INITS[pretrained]} | {task.name} | "
                         + " | ".join(mean_std(per_metric[m][cell]) for m in FINETUNE_METRICS)
                         + f" | {judged(cell, numbers, accuracy, pretrainings if pretrained else None)} | {gain} |")
            for point in (p for p in summaries if p.cell == cell and (p, pretrained) in evals):
                done = evals[point, pretrained]  # per run fine-tuned; a diverged one's numbers null
                summary.append({**point.to_json(), "init": INITS[pretrained], "task": task.name,
                                "finetune_seeds": args.seeds,
                                **({"diverged_at": summaries[point]["diverged_at"]} if done is None else {}),
                                **{m: None if done is None else [r["test"]["test"][m] for r in done[task.name]]
                                   for m in FINETUNE_METRICS}})
    lines += [""] + [f"- `{t.name}`: {len(t.classes)} classes ({', '.join(t.classes)}); {len(t.train)} / "
                     f"{len(t.validation)} / {len(t.test)} train / validation / test examples. {t.note}" for t in tasks]
    lines.append("")
    for name in dict.fromkeys(cell[0] for cell in cells):
        model = SPEC.model(name)
        lines += sweep_section(out, model, values, metrics, args.sweeps)
        mine = [run for run in runs if run.point.model == name]
        plot_losses(mine, out / f"{name}_loss_curves.png", "cross-entropy (nats/base)")
        lines += [f"![{model.title} loss curves]({name}_loss_curves.png)", ""]
        if plot_alphas_of_first([r for r in mine if r.norm != baseline_norm(args, SPEC.model(name))], out / f"{name}_dyt_alpha.png"):
            lines += [f"![{model.title} DyT alpha]({name}_dyt_alpha.png)", ""]
    write_json(out / "summary.json", summary, strict=True)
    report = out / "report.md"
    write_text_whole(report, "\n".join(lines))  # after summary.json; a kill leaves the old report whole
    return report


cli = command("dyt-dna-compare", main)
"""The console script (exit status 0 on success, 2 on bad input)."""

if __name__ == "__main__":
    raise SystemExit(cli())
