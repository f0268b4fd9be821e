"""The compare commands' report tables (LLaMA, wav2vec 2.0, DNA) equal what the hand-made run
folders hold: metrics.jsonl rows shaped as the harness's MetricsLogger writes them, config.yaml as the
trainer dumps it, and eval JSON files as reuse_or_compute stores them. No training is launched: the
report writers are called with ``Run`` objects pointing at those folders, and every expected cell is
computed here with statistics.mean / stdev over seeds."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
from pathlib import Path

import datasets
import pytest

from dyt.train import dump_yaml, load_config
from dyt.train.compare import (
    EVALS_VERSION,
    INITS,
    NO_VERDICT,
    ONE_PRETRAINING,
    Point,
    Run,
    downstream_evals,
    pretraining_gain,
    reuse_or_compute,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TINY = ROOT / "recipes" / "llama" / "tiny.yaml"
WAV2VEC2_TINY = ROOT / "recipes" / "wav2vec2" / "tiny.yaml"
DNA_CONFIGS = [ROOT / "recipes" / "dna" / "hyena-tiny.yaml", ROOT / "recipes" / "dna" / "caduceus-tiny.yaml"]


# ---------------------------------------------------------------- helpers

def fmt(values: list[float], digits: int = 3) -> str:
    """What a mean ± std cell over seeds must read (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [c.strip() for c in line[1:-1].split("|")]


def table(text: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with ``first_column``, as {header: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = _cells(lines[start])
    assert set(lines[start + 1]) <= {"|", "-"}, lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), (header, cells)
        rows.append(dict(zip(header, cells)))
    return rows


def write_metrics(run_dir: Path, logged: list[dict], evals: dict[int, dict], rss: list[float], log_every: int = 5) -> None:
    """metrics.jsonl as the trainer writes it: one row per logged step ({"step": s, "train/loss", "lr",
    "throughput", "step_seconds", train extras, alpha/...}), validation values merged into the row of
    their step, ``peak_rss_mb/rank<i>`` into the last row."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, values in enumerate(logged):
        step = (i + 1) * log_every
        row = dict(values)
        row.update(evals.get(step, {}))
        rows.append((step, row))
    rows[-1][1].update({f"peak_rss_mb/rank{r}": v for r, v in enumerate(rss)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **row}) + "\n" for s, row in rows))


def train_row(rng: random.Random, loss: float, throughput: float, alphas: list[str], **extras) -> dict:
    row = {"train/loss": loss, "lr": rng.uniform(1e-4, 5e-4), "throughput": throughput,
           "step_seconds": rng.uniform(0.05, 0.5), **extras}
    row.update({f"alpha/{name}": rng.uniform(0.3, 0.8) for name in alphas})
    return row


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- LLaMA


def _llama_run(root: Path, norm: str, seed: int, ranks: int) -> tuple[Run, dict]:
    """One hand-made pretraining run and the values its report row is made of."""
    from dyt_llama.task import LlamaConfig

    rng = random.Random(f"llama-{norm}-{seed}")
    config = load_config(LlamaConfig, LLAMA_TINY, [f"model.norm.kind={norm}", f"train.seed={seed}"])
    run_dir = root / f"{norm}-seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    alphas = [f"blocks.{i}.{n}" for i in range(2) for n in ("attention_norm", "ffn_norm")] + ["norm"] if norm == "dyt" else []
    losses = [6.0 - 0.4 * i + rng.uniform(-0.05, 0.05) for i in range(8)]
    speeds = [rng.uniform(500, 900)] + [rng.uniform(4000, 6000) for _ in range(7)]  # the first includes warm-up
    evals = {step: {"eval/loss": rng.uniform(3, 6)} for step in (20, 40)}
    for values in evals.values():
        values["eval/perplexity"] = math.exp(values["eval/loss"])
        values["eval/examples"], values["eval/examples_available"] = 64, 1000
    rss = [rng.uniform(800, 1600) for _ in range(ranks)]
    write_metrics(run_dir, [train_row(rng, loss, speed, alphas) for loss, speed in zip(losses, speeds)], evals, rss)
    wall = rng.uniform(100, 400)
    expected = {"final": statistics.mean(losses[-3:]), "eval": evals[40]["eval/loss"],
                "ppl": evals[40]["eval/perplexity"], "tokens": statistics.median(speeds[1:]), "rss": rss, "wall": wall}
    return Run(Point(norm, seed, model="llama"), run_dir, wall), expected


@pytest.mark.parametrize("ranks", [2, 12])
def test_llama_report_cells_are_means_over_pretraining_seeds(tmp_path, monkeypatch, ranks):
    from dyt_llama import compare

    s_curves = []

    def fake_s_curves(run, path):  # needs a trained checkpoint and the corpus; not what is tested here
        s_curves.append(run)
        path.write_bytes(b"\x89PNG fake")

    monkeypatch.setattr(compare, "plot_s_curves", fake_s_curves)
    out = tmp_path / "cmp"
    out.mkdir()
    args = argparse.Namespace(out=out, config=LLAMA_TINY, overrides=["train.lr=0.002"], nproc=ranks,
                              launcher="deepspeed", norms=["rmsnorm", "dyt"], seeds=[0, 1], sweeps=[])
    made = [_llama_run(out, norm, seed, ranks) for seed in args.seeds for norm in args.norms]  # main()'s order
    runs = [run for run, _ in made]
    report = compare.write_report(args, runs, ["b/four", "c/five"], "your corpus `/data/text`", ["A note."])
    text = report.read_text()
    assert "\n\nA note.\n\n" in text
    assert ("text: your corpus `/data/text`. Validation: whole documents held out of training: b/four, c/five; "
            "each validation scored 64 of its 1000 windows, spread evenly over them.") in text
    assert "Set over the config for every run: `train.lr=0.002`." in text  # what the runs were given, in the report

    rows = table(text, "norm")
    assert [r["norm"] for r in rows] == args.norms
    for row in rows:
        mine = [e for run, e in made if run.norm == row["norm"]]
        assert len(mine) == 2
        assert row["final train loss"] == fmt([e["final"] for e in mine])
        assert row["validation loss"] == fmt([e["eval"] for e in mine])
        assert row["validation perplexity"] == fmt([e["ppl"] for e in mine], 1)
        assert row["tokens/s"] == fmt([e["tokens"] for e in mine], 0)
        # peak memory: per rank, in rank order, the mean over the seeds
        assert row["peak RSS per rank (MB)"] == " / ".join(
            f"{statistics.mean(per_seed):.0f}" for per_seed in zip(*(e["rss"] for e in mine)))
        assert row["wall time (s)"] == fmt([e["wall"] for e in mine], 0)
        assert row["verdict (validation loss, vs rmsnorm)"] == ("baseline" if row["norm"] == "rmsnorm" else NO_VERDICT)
    assert "seeds [0, 1]" in text and "b/four, c/five;" in text

    summary = json.loads((out / "summary.json").read_text())
    assert [(s["norm"], s["seed"]) for s in summary] == [(r.norm, r.seed) for r in runs]
    for s, (_, e) in zip(summary, made):
        assert s["eval_loss"] == e["eval"] and s["peak_rss_mb"] == e["rss"]
    assert is_png(out / "loss_curves.png") and is_png(out / "dyt_alpha.png")
    assert [r.norm for r in s_curves] == ["rmsnorm"]


def test_reports_say_which_rows_have_what_the_norm_kind_decides():
    """The scalar after the embedding decided the tiny LLaMA's parity (docs/llama.md), and a row's norm
    name does not show whether its model had it: the reports say which rows did, as resolved from each
    run's config (a sweep can set it per point), per model where a comparison has several."""
    from dyt.norms import norm_variant_overrides
    from dyt.train.compare import PlannedRun, rows_with
    from dyt_dna.task import DnaConfig
    from dyt_llama.task import LlamaConfig

    def planned(config_class, path, norm, *sweep, model="llama"):
        items = [*norm_variant_overrides(norm), *(f"{k}={v}" for k, v in sweep)]
        point = Point(norm, 0, model=model, sweep=sweep)
        return PlannedRun(point, path, items, Path("x"), load_config(config_class, path, items))

    def scalar(plan, title=str):
        return rows_with(plan, lambda config: config.model.scales_embedding(), "scalar", title)

    def llama(norm, *sweep):
        return planned(LlamaConfig, LLAMA_TINY, norm, *sweep)

    assert scalar([llama("rmsnorm"), llama("dyt")]) == "scalar: every row."
    paper = (("model.embedding_scale", "null"),)
    assert scalar([llama("rmsnorm", *paper), llama("dyt", *paper), llama("fixup", *paper)]) == (
        "scalar: only dyt (model.embedding_scale=null).")
    off = (("model.embedding_scale", "false"),)
    assert scalar([llama("rmsnorm", *off), llama("dyt", *off)]) == "scalar: no row."

    dna = [planned(DnaConfig, ROOT / "recipes" / "dna" / f"{arch}-tiny.yaml", norm, model=arch)
           for arch, norms in (("hyena", ("layernorm", "dyt")), ("caduceus", ("rmsnorm", "dyt"))) for norm in norms]
    assert scalar(dna, str.upper) == "scalar: only HYENA dyt, CADUCEUS dyt."
    assert rows_with(dna, lambda config: config.model.ties_embeddings(), "tied") == (
        "tied: only hyena layernorm, hyena dyt.")  # caduceus-tiny.yaml: untied for every norm


# ---------------------------------------------------------------- wav2vec 2.0


def _w2v_run(root: Path, norm: str, last_eval: dict, earlier_eval: dict) -> tuple[Run, dict]:
    from dyt_wav2vec2.task import Wav2Vec2PretrainConfig

    rng = random.Random(f"w2v-{norm}")
    run_dir = root / norm
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(Wav2Vec2PretrainConfig, WAV2VEC2_TINY,
                                                               [f"model.norm.kind={norm}"])))
    alphas = ["encoder.layers.0.self_attn_layer_norm", "encoder.layers.0.ffn_layer_norm"] if norm == "dyt" else []
    losses = [5.0 - 0.1 * i + rng.uniform(-0.05, 0.05) for i in range(20)]
    speeds = [rng.uniform(2, 5)] + [rng.uniform(40, 60) for _ in range(19)]  # audio seconds per second
    logged = [train_row(rng, loss, speed, alphas, **{"train/contrastive": loss - 0.2,
                                                     "train/codebook_perplexity": rng.uniform(30, 120)})
              for loss, speed in zip(losses, speeds)]
    evals = {}
    for step, values in ((25, earlier_eval), (50, earlier_eval), (75, earlier_eval), (100, last_eval)):
        evals[step] = {"eval/loss": rng.uniform(3, 4), "eval/contrastive": rng.uniform(2, 3),
                       "eval/code_perplexity": rng.uniform(10, 60), **values}
    rss = [rng.uniform(900, 1400) for _ in range(2)]
    write_metrics(run_dir, logged, evals, rss)
    wall = rng.uniform(200, 600)
    seconds = [r["step_seconds"] for r in logged[1:]]
    expected = {"final": statistics.mean(losses[-3:]), "steps_per_s": 1 / statistics.median(seconds),
                "audio": statistics.median(speeds[1:]), "rss": rss, "wall": wall, **last_eval}
    return Run(Point(norm, 0, model="wav2vec2"), run_dir, wall), expected


def _finetune_result(rng: random.Random, seed: int, tests: list[str], classes: int) -> dict:
    """One seed's FinetuneResult as eval_results yields it (dataclasses.asdict, through JSON)."""
    confusion = [[rng.randint(0, 3) for _ in range(classes)] for _ in range(classes)]
    return {"seed": seed, "best_step": 40, "validation": {"accuracy": 0.5, "mcc": 0.4, "f1": 0.45},
            "test": {t: {"accuracy": rng.uniform(0.1, 0.9), "mcc": rng.uniform(0, 0.8), "f1": rng.uniform(0.1, 0.9)}
                     for t in tests},
            "details": {t: confusion for t in tests},
            "curve": [{"step": 40, "train/loss": 1.0, "validation/loss": 1.1, "accuracy": 0.5, "mcc": 0.4, "f1": 0.45}]}


def _w2v_evals(rng: random.Random, seeds: list[int]) -> dict[str, list[dict]]:
    """One model's eval_results (dataclasses.asdict, through JSON), as the eval-<name>.json files hold them per seed."""
    from dyt_wav2vec2.eval import CONTRASTIVE_TESTS, CTC_TESTS, KEYWORD_TESTS
    from dyt_wav2vec2.speech import KEYWORDS

    results = {"contrastive": [{"seed": seed, "test": {t: {
        "contrastive": rng.uniform(2, 3), "codebook_perplexity": rng.uniform(50, 120), "code_perplexity": rng.uniform(10, 60),
        "contrastive_kept": rng.uniform(2, 3.5), "contrastive_accuracy": rng.uniform(0.05, 0.5),
        "distractors_equal_target": rng.uniform(0, 0.3), "utterances": 200} for t in CONTRASTIVE_TESTS}} for seed in seeds]}
    for name in ("probe", "finetune"):
        results[name] = [_finetune_result(rng, seed, list(KEYWORD_TESTS), len(KEYWORDS)) for seed in seeds]
    results["ctc"] = [{"seed": seed, "best_step": 150, "validation": {"loss": 1.0, "cer": 0.4, "wer": 0.9},
                       "test": {t: {"loss": 1.0, "cer": rng.uniform(0.2, 0.7), "wer": rng.uniform(0.5, 1.0)} for t in CTC_TESTS},
                       "details": {t: [["please hold", "pleas hold"]] * 3 for t in CTC_TESTS},
                       "curve": [{"step": 150, "train/loss": 1.0, "validation/loss": 1.1, "cer": 0.4, "wer": 0.9}]}
                      for seed in seeds]
    return results


def test_wav2vec2_report_marks_the_collapsed_run_and_averages_downstream_seeds(tmp_path):
    from dyt_wav2vec2 import compare
    from dyt_wav2vec2.eval import HEADLINE
    from dyt_wav2vec2.task import Wav2Vec2PretrainConfig

    args = argparse.Namespace(out=tmp_path / "cmp", config=WAV2VEC2_TINY, overrides=[], nproc=2, launcher="deepspeed",
                              pretrain_seeds=[0], seeds=[0, 1], steps=150, ctc_steps=4000, ctc_lr=5e-3,
                              ctc_schedule="tri-stage",
                              evals=["contrastive", "probe", "finetune", "ctc"],
                              norms=None, sweeps=[])
    args.out.mkdir()
    model = load_config(Wav2Vec2PretrainConfig, WAV2VEC2_TINY).model
    most = model.codebooks * model.codebook_entries
    chance = 1 / (model.distractors + 1)
    learning = {"eval/contrastive_kept": 2.3456, "eval/contrastive_accuracy": 4.1 * chance,
                "eval/codebook_perplexity": 0.94 * most, "eval/distractors_equal_target": 0.0123}
    collapsed = {"eval/contrastive_kept": 3.0123, "eval/contrastive_accuracy": 3.3 * chance,  # above twice chance:
                 "eval/codebook_perplexity": 0.96 * most,  # collapsed by the codebook alone
                 "eval/distractors_equal_target": 0.4567}
    # Earlier validations say the opposite: the report must read the last one.
    made = [_w2v_run(args.out, "layernorm", learning, collapsed), _w2v_run(args.out, "dyt", collapsed, learning)]
    runs = [run for run, _ in made]

    evals = {}  # as main() makes it: (point, pretrained) -> eval -> the results reused from the run folder
    for run in runs:
        for pretrained, init in compare.INITS.items():
            settings = {"steps": args.steps, "pretrained": pretrained}
            results = _w2v_evals(random.Random(f"evals-{run.label}-{init}"), args.seeds)
            for name, rows in results.items():
                path = run.dir / f"eval-{name}{'' if pretrained else '-random-init'}.json"
                path.write_text(json.dumps({"settings": settings, "evals_version": EVALS_VERSION,
                                            "seeds": {str(row["seed"]): row for row in rows}}, indent=1))
                evals.setdefault((run.point, pretrained), {})[name] = reuse_or_compute(
                    path, settings, args.seeds, lambda seed: pytest.fail("evals not reused"))

    text = compare.write_report(args, runs, evals).read_text()
    assert "(150 steps each, CTC 4000 at peak lr 0.005, tri-stage, best validation checkpoint)" in text
    d, codes = model.distractors, model.codebooks * model.codebook_entries
    assert (f"Contrastive loss over all 1 + {d} candidates (chance ln {d + 1} = {math.log(d + 1):.3f})" in text
            and f"Perplexity of {codes} codes." in text)
    # the runs' own models, where a sweep changed them (the header read the base config)
    assert compare.chance_levels({(d, codes), (7, 64)}).endswith(
        f"The runs' models differ (a sweep): 7 distractors (chance ln 8 = 2.079, 1/8), 64 codes; "
        f"{d} distractors (chance ln {d + 1} = {math.log(d + 1):.3f}, 1/{d + 1}), {codes} codes.")
    rows = table(text, "norm")
    assert [r["norm"] for r in rows] == ["layernorm", "dyt"]
    for row, (_, e) in zip(rows, made):
        assert row["final train loss"] == f"{e['final']:.3f}"
        assert row["validation contrastive"] == f"{e['eval/contrastive_kept']:.3f}"
        assert row["contrastive accuracy"] == f"{e['eval/contrastive_accuracy']:.3f}"
        assert row["codebook perplexity"] == f"{e['eval/codebook_perplexity']:.1f}"
        assert row["distractors equal to target"] == f"{e['eval/distractors_equal_target']:.1%}"
        assert row["steps/s"] == f"{e['steps_per_s']:.2f}"
        assert row["audio s / s"] == f"{e['audio']:.1f}"
        assert row["peak RSS per rank (MB)"] == " / ".join(f"{v:.0f}" for v in e["rss"])
        assert row["wall time (s)"] == f"{e['wall']:.0f}"
    assert rows[0]["status"] == "learning"
    assert rows[1]["status"].startswith("**collapsed**")
    assert f"{0.96 * most:.0f} of {most}" in rows[1]["status"]  # the perplexity against codebooks x entries

    downstream = table(text, "norm | init")
    expected = []
    for (point, pretrained), results in evals.items():
        for name, per_seed in results.items():
            for metric in HEADLINE[name]:
                values = {t: [r["test"][t][metric] for r in per_seed]
                          for t in ("unseen voices", "real recordings")}
                expected.append(((point.norm, compare.INITS[pretrained], compare.EVAL_NAMES[name],
                                  compare.METRIC_NAMES[metric]), values))
    assert len(expected) == 2 * 2 * (2 + 1 + 1 + 2)  # norms x inits x (contrastive 2, probe, finetune, ctc 2)
    assert [(r["norm"], r["init"], r["eval"], r["metric"]) for r in downstream] == [key for key, _ in expected]
    for row, (_, values) in zip(downstream, expected):
        for test, per_seed in values.items():
            assert len(per_seed) == 2 and row[test] == fmt(per_seed), (row, test)
            no_verdict = ONE_PRETRAINING if row["init"] == "pretrained" else NO_VERDICT  # 1 pretraining, 2 seeds
            assert row[f"verdict ({test})"] == ("baseline" if row["norm"] == "layernorm" else no_verdict)
    summary = json.loads((args.out / "summary.json").read_text())
    rows = [r for r in summary if (r["norm"], r["init"], r["eval"], r["metric"]) == ("dyt", "random init", "ctc", "wer")]
    assert len(rows) == 1 and rows[0]["real recordings"] == [
        r["test"]["real recordings"]["wer"] for r in evals[runs[1].point, False]["ctc"]]
    assert len(summary) == len(expected)
    for png in ("loss_curves.png", "dyt_alpha.png", "confusion_layernorm.png", "confusion_dyt.png"):
        assert is_png(args.out / png), png

    # DyT's pretraining diverged: its pretrained evals are rows of nulls in summary.json, as in the report
    runs[1] = dataclasses.replace(runs[1], diverged=DIVERGED_AT_7)
    evals[runs[1].point, True] = None
    compare.write_report(args, runs, evals)
    summary = json.loads((args.out / "summary.json").read_text(), parse_constant=pytest.fail)
    dead = [r for r in summary if (r["norm"], r["init"]) == ("dyt", "pretrained")]
    assert len(summary) == len(expected) and len(dead) == 2 + 1 + 1 + 2
    assert all(r["diverged_at"] == 7 and r["unseen voices"] is r["real recordings"] is None for r in dead)

    # a run whose saved model has other distractors (as a sweep of model.distractors makes): the header says so
    saved = load_config(Wav2Vec2PretrainConfig, runs[0].dir / "config.yaml", check_files=False)
    saved.model.distractors = 7
    (runs[0].dir / "config.yaml").write_text(dump_yaml(saved))
    assert "The runs' models differ (a sweep): 7 distractors" in compare.write_report(args, runs, evals).read_text()


# ---------------------------------------------------------------- DNA


def _dna_run(root: Path, config_path: Path, norm: str, seed: int = 0) -> tuple[object, Run, dict]:
    from dyt_dna.task import DnaConfig

    config = load_config(DnaConfig, config_path, [f"model.norm.kind={norm}"])
    arch = config.model.arch
    rng = random.Random(f"dna-{arch}-{norm}" + (f"-{seed}" if seed else ""))
    run_dir = root / f"{arch}-{norm}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    alphas = ["layers.0.norm1", "layers.1.norm1"] if norm == "dyt" else []
    losses = [1.39 - 0.01 * i + rng.uniform(-0.003, 0.003) for i in range(20)]
    speeds = [rng.uniform(100, 500)] + [rng.uniform(20000, 40000) for _ in range(19)]
    evals = {step: {"eval/loss": rng.uniform(1.2, 1.4)} for step in (25, 50, 75, 100)}
    for values in evals.values():
        values["eval/perplexity"] = math.exp(values["eval/loss"])
    rss = [rng.uniform(700, 1200) for _ in range(12)]  # 12 ranks: rank 10 must come after rank 9
    write_metrics(run_dir, [train_row(rng, loss, speed, alphas) for loss, speed in zip(losses, speeds)], evals, rss)
    wall = rng.uniform(50, 300)
    expected = {"final": statistics.mean(losses[-3:]), "eval": evals[100]["eval/loss"],
                "ppl": evals[100]["eval/perplexity"], "bases": statistics.median(speeds[1:]), "rss": rss, "wall": wall}
    return config, Run(Point(norm, seed, model=arch), run_dir, wall), expected


def test_dna_report_rows_per_model_norm_init_and_task(tmp_path):
    from dyt_dna import SPEC, compare
    from dyt_dna.data import ClassificationData

    args = argparse.Namespace(out=tmp_path / "cmp", configs=DNA_CONFIGS, nproc=12, launcher="deepspeed",
                              pretrain_seeds=[0], seeds=[0, 1], norms=None, sweeps=[], overrides=[])
    args.out.mkdir()
    made = [_dna_run(args.out, path, norm) + (norm,)
            for path, norms in zip(DNA_CONFIGS, (("layernorm", "dyt"), ("rmsnorm", "dyt"))) for norm in norms]
    runs = [run for _, run, _, _ in made]

    def split(n: int, classes: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"sequence": ["ACGT" * 8] * n, "label": [i % classes for i in range(n)]})

    tasks = [ClassificationData("species", ["E.Coli", "H.Pylori", "S.Aureus", "V.Cholerae"], split(40, 4), split(12, 4),
                                split(8, 4), "species note."),
             ClassificationData("coding", ["non-coding", "coding"], split(30, 2), split(6, 2), split(10, 2), "coding note.")]
    settings = {"finetune": {"lr": 1e-3}, "window": 128, "per_class": 100}
    evals = {}  # as main() makes it: (run.point, pretrained) -> task -> the eval JSON reused from the run folder
    for run in runs:
        for task in tasks:
            for pretrained, init in compare.INITS.items():
                rng = random.Random(f"{run.point.model}-{run.norm}-{task.name}-{init}")
                results = [{**_finetune_result(rng, seed, ["test"], len(task.classes)), "task": task.name,
                            "note": task.note} for seed in args.seeds]  # result_row's rows
                path = run.dir / f"eval-{task.name}{'' if pretrained else '-random-init'}.json"
                path.write_text(json.dumps({"settings": settings, "evals_version": EVALS_VERSION,
                                            "seeds": {str(row["seed"]): row for row in results}}, indent=1))
                evals.setdefault((run.point, pretrained), {})[task.name] = reuse_or_compute(
                    path, settings, args.seeds, lambda seed: pytest.fail("evals not reused"))

    text = compare.write_report(args, runs, tasks, evals, "held-out strains", ["A note.", "Another."]).read_text()
    assert "\n\nA note.\n\nAnother.\n\n" in text  # each note a paragraph of its own
    pretraining = table(text, "model")
    assert [(r["model"], r["norm"]) for r in pretraining] == [
        ("HyenaDNA", "layernorm"), ("HyenaDNA", "dyt"), ("Caduceus", "rmsnorm"), ("Caduceus", "dyt")]
    for row, (_, _, e, _) in zip(pretraining, made):
        assert row["final train loss"] == f"{e['final']:.4f}"
        assert row["validation loss"] == f"{e['eval']:.4f}"
        assert row["validation perplexity"] == f"{e['ppl']:.3f}"
        assert row["bases/s"] == f"{e['bases']:.0f}"
        assert row["peak RSS per rank (MB)"] == " / ".join(f"{v:.0f}" for v in e["rss"])  # rank order
        assert row["wall time (s)"] == f"{e['wall']:.0f}"
        # one pretraining seed: no verdict, in words
        assert row["verdict (validation loss)"] == ("baseline" if row["norm"] != "dyt" else NO_VERDICT)

    finetuning = table(text, "model | norm | init")
    assert len(finetuning) == len(runs) * len(tasks) * 2
    keyed = {(r["model"], r["norm"], r["init"], r["task"]): r for r in finetuning}
    assert len(keyed) == len(finetuning)
    for run in runs:
        norm, model = run.norm, SPEC.model(run.point.model).title
        for task in tasks:
            for pretrained, init in compare.INITS.items():
                results = evals[run.point, pretrained][task.name]
                row = keyed[(model, norm, init, task.name)]
                for metric, column in (("accuracy", "accuracy"), ("mcc", "MCC"), ("f1", "F1 (macro)")):
                    values = [r["test"]["test"][metric] for r in results]
                    assert len(values) == 2 and row[column] == fmt(values), (row, metric)
                no_verdict = ONE_PRETRAINING if init == "pretrained" else NO_VERDICT  # 1 pretraining, 2 seeds
                assert row["verdict (accuracy)"] == ("baseline" if norm != "dyt" else no_verdict)
                assert row["pretrained − random init (accuracy)"] == ("-" if init == "random init" else NO_VERDICT)
    for task in tasks:
        assert (f"`{task.name}`: {len(task.classes)} classes ({', '.join(task.classes)}); {len(task.train)} / "
                f"{len(task.validation)} / {len(task.test)} train / validation / test examples.") in text
    summary = json.loads((args.out / "summary.json").read_text())
    assert len(summary) == 16 and all(len(s["mcc"]) == 2 for s in summary)
    for png in ("hyena_loss_curves.png", "hyena_dyt_alpha.png", "caduceus_loss_curves.png", "caduceus_dyt_alpha.png"):
        assert is_png(args.out / png), png


def _dna_results(run: Run, pretrained: bool, task, seeds: list[int]) -> dict[str, list[dict]]:
    """One run's fine-tuning results on ``task`` as the DNA compare's fine-tuning returns them (task name ->
    result_row's rows), for :func:`~dyt.train.compare.downstream_evals`."""
    return {task.name: [{**_finetune_result(random.Random(f"{run.point}-{INITS[pretrained]}-{seed}"), seed, ["test"], 4),
                         "task": task.name, "note": task.note} for seed in seeds]}


def test_dna_downstream_cells_are_over_pretraining_seeds_when_there_are_three(tmp_path):
    """--pretrain-seeds 0 1 2: each downstream cell's mean ± std and verdict are over the three
    pretraining runs' means (each over the fine-tuning seeds), not over the pooled fine-tunings."""
    from dyt_dna import compare
    from dyt_dna.data import ClassificationData

    args = argparse.Namespace(out=tmp_path / "cmp", configs=DNA_CONFIGS[:1], nproc=2, launcher="deepspeed",
                              pretrain_seeds=[0, 1, 2], seeds=[0, 1, 2], norms=None, sweeps=[], overrides=[])
    args.out.mkdir()
    runs = [_dna_run(args.out, DNA_CONFIGS[0], norm, seed)[1] for seed in args.pretrain_seeds
            for norm in ("layernorm", "dyt")]
    split = datasets.Dataset.from_dict({"sequence": ["ACGT" * 8] * 8, "label": [i % 4 for i in range(8)]})
    task = ClassificationData("species", ["a", "b", "c", "d"], split, split, split, "note.")
    # as main() makes them: random init once per cell
    evals = downstream_evals(runs, lambda run, pretrained: _dna_results(run, pretrained, task, args.seeds))
    assert len(evals) == 6 + 2
    text = compare.write_report(args, runs, [task], evals, "held-out strains").read_text()
    assert "Pretraining seeds 0, 1, 2: each pretrained row's mean ± std and verdict are over the pretraining runs' means" in text
    assert "Random-init rows: the fine-tuning seeds of the one untrained model" in text

    def means(norm: str) -> list[float]:  # the pretrained runs' means over the fine-tuning seeds
        return [statistics.mean(r["test"]["test"]["accuracy"] for r in evals[run.point, True][task.name])
                for run in runs if run.norm == norm]

    def untrained(norm: str) -> list[float]:  # the one random-init fine-tuning of the cell, per fine-tuning seed
        first = next(run for run in runs if run.norm == norm)
        return [r["test"]["test"]["accuracy"] for r in evals[first.point, False][task.name]]

    rows = {(r["norm"], r["init"]): r for r in table(text, "model | norm | init")}
    assert len(rows) == 4
    for norm in ("layernorm", "dyt"):
        assert rows[norm, "pretrained"]["accuracy"] == fmt(means(norm))
        assert rows[norm, "random init"]["accuracy"] == fmt(untrained(norm))
    assert rows["dyt", "pretrained"]["verdict (accuracy)"] == verdict(
        means("dyt"), means("layernorm"), higher_is_better=True, baseline_name="layernorm")
    gain = pretraining_gain(means("dyt"), untrained("dyt"), higher_is_better=True)
    assert gain != NO_VERDICT and rows["dyt", "pretrained"]["pretrained − random init (accuracy)"] == gain
    judged = verdict(untrained("dyt"), untrained("layernorm"), higher_is_better=True, baseline_name="layernorm")
    assert judged != NO_VERDICT and rows["dyt", "random init"]["verdict (accuracy)"] == judged
    pretraining = table(text, "model")
    assert [r["norm"] for r in pretraining] == ["layernorm"] * 3 + ["dyt"] * 3  # a row per run, grouped by cell
    assert [r["seed"] for r in pretraining] == ["0", "1", "2"] * 2
    assert NO_VERDICT not in pretraining[3]["verdict (validation loss)"]  # three pretraining seeds: a verdict


DIVERGED_AT_7 = {"step": 7, "loss": "nan", "last_good": None}
"""A pretraining run's divergence record (dyt.train.checkpoint.DIVERGED) as a comparison reads it."""


def test_llama_report_names_a_diverged_seed_and_gives_its_cell_no_verdict(tmp_path, monkeypatch):
    """DyT's seed 1 and RMSNorm's seed 0 diverged: a validation loss that is no number to average,
    and a mean over the seeds that trained would hide the failure behind a verdict."""
    from dyt_llama import compare

    s_curves = []  # from a run's last checkpoint: never a diverged one's
    monkeypatch.setattr(compare, "plot_s_curves", lambda run, path: s_curves.append(run) or path.write_bytes(b"\x89PNG"))
    args = argparse.Namespace(out=tmp_path / "cmp", config=LLAMA_TINY, overrides=[], nproc=2, launcher="deepspeed",
                              norms=["rmsnorm", "dyt"], seeds=[0, 1, 2], sweeps=[])
    args.out.mkdir()
    made = [_llama_run(args.out, norm, seed, 2) for seed in args.seeds for norm in args.norms]
    runs = [dataclasses.replace(run, diverged=DIVERGED_AT_7) if (run.norm, run.seed) in (("dyt", 1), ("rmsnorm", 0))
            else run for run, _ in made]
    text = compare.write_report(args, runs, ["x"], "the built-in corpus").read_text()
    assert [(run.norm, run.seed) for run in s_curves] == [("rmsnorm", 1)]
    rows = {r["norm"]: r for r in table(text, "norm")}
    trained = [e for run, e in made if run.norm == "dyt" and run.seed != 1]
    assert rows["dyt"]["validation loss"] == f"{fmt([e['eval'] for e in trained])} (1 of 3 seeds not finite)"
    assert rows["dyt"]["verdict (validation loss, vs rmsnorm)"] == (
        "no verdict: not finite in 1 of 3 seeds of this row and 1 of 3 seeds of rmsnorm")
    assert rows["dyt"]["peak RSS per rank (MB)"] == " / ".join(
        f"{statistics.mean(v):.0f}" for v in zip(*(e["rss"] for e in trained)))  # the runs that logged it
    assert rows["rmsnorm"]["verdict (validation loss, vs rmsnorm)"] == "baseline"
    assert "- dyt, seed 1: training loss nan at step 7 (last complete checkpoint: none)" in text.splitlines()
    assert "- rmsnorm, seed 0: training loss nan at step 7 (last complete checkpoint: none)" in text.splitlines()
    summary = json.loads((args.out / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert len(summary) == 6 and [r["eval_loss"] for r in summary if r["norm"] == "dyt"][1] is None


def test_dna_report_gives_a_diverged_pretraining_nan_downstream_values(tmp_path):
    """A diverged pretraining run has no model to fine-tune: its downstream values are NaN, so the
    cell says so and gets no verdict, instead of a mean over the two runs that trained."""
    from dyt_dna import compare
    from dyt_dna.data import ClassificationData

    args = argparse.Namespace(out=tmp_path / "cmp", configs=DNA_CONFIGS[:1], nproc=2, launcher="deepspeed",
                              pretrain_seeds=[0, 1, 2], seeds=[0, 1, 2], norms=None, sweeps=[], overrides=[])
    args.out.mkdir()
    runs = [_dna_run(args.out, DNA_CONFIGS[0], norm, seed)[1] for seed in args.pretrain_seeds
            for norm in ("layernorm", "dyt")]
    runs[3] = dataclasses.replace(runs[3], diverged=DIVERGED_AT_7)  # dyt, seed 1
    split = datasets.Dataset.from_dict({"sequence": ["ACGT" * 8] * 8, "label": [i % 4 for i in range(8)]})
    task = ClassificationData("species", ["a", "b", "c", "d"], split, split, split, "note.")
    evals = downstream_evals(runs, lambda run, pretrained: _dna_results(run, pretrained, task, args.seeds))
    assert len(evals) == 6 + 2 and evals[runs[3].point, True] is None  # the diverged run is not fine-tuned
    text = compare.write_report(args, runs, [task], evals, "held-out strains").read_text()
    rows = {(r["norm"], r["init"]): r for r in table(text, "model | norm | init")}
    trained = [statistics.mean(r["test"]["test"]["accuracy"] for r in evals[run.point, True][task.name])
               for run in runs if run.norm == "dyt" and run.diverged is None]
    assert rows["dyt", "pretrained"]["accuracy"] == f"{fmt(trained)} (1 of 3 seeds not finite)"
    assert rows["dyt", "pretrained"]["verdict (accuracy)"] == "no verdict: not finite in 1 of 3 seeds of this row"
    assert rows["dyt", "pretrained"]["pretrained − random init (accuracy)"].startswith("no verdict: not finite")
    assert not rows["dyt", "random init"]["verdict (accuracy)"].startswith("no verdict")  # needs no pretraining
    pretraining = table(text, "model")
    assert [r["validation loss"] for r in pretraining if r["norm"] == "dyt"][1] == "nan"
    assert [r["verdict (validation loss)"] for r in pretraining if r["norm"] == "dyt"] == [
        "no verdict: not finite in 1 of 3 seeds of this row"] * 3
    assert "- dyt, seed 1: training loss nan at step 7 (last complete checkpoint: none)" in text.splitlines()
    summary = json.loads((args.out / "summary.json").read_text(), parse_constant=pytest.fail)
    pretrained = [r for r in summary if r["init"] == "pretrained"]
    assert len(pretrained) == 6  # every pretraining run, the diverged one with null numbers, as the report counts it
    assert {(r["norm"], r["seed"]) for r in pretrained if r["accuracy"] is None} == {("dyt", 1)}
    assert [r.get("diverged_at") for r in pretrained if r["accuracy"] is None] == [7]


def test_stored_evals_are_reused_only_from_the_same_settings_and_evals_version(tmp_path, capsys):
    """A relaunch reuses an eval's stored results; results made with other settings, or by older
    evals (before EVALS_VERSION, or another version, or stored before results were kept per seed),
    are recomputed and stored anew. Seeds read back, and seeds of other settings replaced, are said
    (the log was the same whether a seed was reused or made again)."""
    path, settings = tmp_path / "eval-species.json", {"finetune": {"lr": 1e-3}, "window": 128}
    computed = []

    def compute(seeds):
        for seed in seeds:
            computed.append(seed)
            yield {"seed": seed, "made": len(computed)}

    def never(seeds):
        pytest.fail(f"seeds {seeds} not reused")

    assert reuse_or_compute(path, settings, [0, 1], compute) == [{"seed": 0, "made": 1}, {"seed": 1, "made": 2}]
    assert "read back" not in capsys.readouterr().out
    assert reuse_or_compute(path, settings, [0, 1], never) == [{"seed": 0, "made": 1}, {"seed": 1, "made": 2}]
    assert capsys.readouterr().out == f"{path}: seeds [0, 1] read back\n"
    assert reuse_or_compute(path, {**settings, "window": 256}, [0], compute) == [{"seed": 0, "made": 3}]
    assert capsys.readouterr().out == (f"{path}: its seeds were evaluated with other settings (window 128 -> 256); "
                                       "evaluated again, replacing them\n")
    assert reuse_or_compute(path, {**settings, "window": 256}, [0, 5], compute)[1] == {"seed": 5, "made": 4}
    assert capsys.readouterr().out == f"{path}: seeds [0] read back, computing [5]\n"
    older = {"settings": settings, "seeds": {"0": {"seed": "stale"}}}  # as stored before EVALS_VERSION
    for stored in (older, {**older, "evals_version": EVALS_VERSION - 1},
                   {"settings": settings, "evals_version": EVALS_VERSION, "results": [{"seed": "stale"}]}):
        path.write_text(json.dumps(stored))
        assert reuse_or_compute(path, settings, [0], compute) == [{"seed": 0, "made": len(computed)}]
        assert json.loads(path.read_text())["evals_version"] == EVALS_VERSION
    assert len(computed) == 7
    # a file cut short by a kill, or another tool's list, is computed again (it raised a traceback)
    for stored in ('{"settings": {"finetune"', "[1, 2]"):
        path.write_text(stored)
        assert reuse_or_compute(path, settings, [0], compute) == [{"seed": 0, "made": len(computed)}]
    assert len(computed) == 9 and not list(tmp_path.glob("*.tmp"))


def test_stored_evals_keep_each_seed_as_it_finishes(tmp_path):
    """The missing seeds go to one computation (what is done once per run, weights and frozen
    features, is done once), whose results are stored one by one as they come: a comparison killed
    on its third seed keeps the first two, and the relaunch computes the third alone. More seeds later
    compute only the new ones, fewer reuse theirs, in the order asked."""
    path, settings = tmp_path / "eval-probe.json", {"steps": 150}
    calls = []

    class Killed(Exception):
        pass

    def killed_on(bad):
        def compute(seeds):
            calls.append(list(seeds))
            for seed in seeds:
                if seed == bad:
                    raise Killed
                yield {"seed": seed}
        return compute

    with pytest.raises(Killed):
        reuse_or_compute(path, settings, [0, 1, 2], killed_on(2))
    assert calls == [[0, 1, 2]] and sorted(json.loads(path.read_text())["seeds"]) == ["0", "1"]
    assert reuse_or_compute(path, settings, [0, 1, 2], killed_on(None)) == [{"seed": s} for s in (0, 1, 2)]
    assert calls[1:] == [[2]]
    assert reuse_or_compute(path, settings, [3, 0, 1, 2, 4], killed_on(None)) == [{"seed": s} for s in (3, 0, 1, 2, 4)]
    assert calls[2:] == [[3, 4]]
    assert reuse_or_compute(path, settings, [4, 1], killed_on(None)) == [{"seed": 4}, {"seed": 1}]
    assert len(calls) == 3
    with pytest.raises(ValueError):  # a computation that yields fewer results than seeds
        reuse_or_compute(path, settings, [5, 6], lambda seeds: iter([{"seed": 5}]))


def test_the_wav2vec2_compare_stores_each_eval_and_seed_as_it_finishes(tmp_path, monkeypatch):
    """``dyt-wav2vec2-compare``'s evals go one eval and one seed at a time into the run's
    ``eval-<name>.json``: a comparison killed in an eval keeps every seed and eval done before, more
    seeds or another eval later compute only what is new, and the report reads the same numbers."""
    from dyt_wav2vec2 import compare
    from dyt_wav2vec2.task import Wav2Vec2PretrainConfig

    out = tmp_path / "cmp"
    learning = {"eval/contrastive_kept": 2.3, "eval/contrastive_accuracy": 0.3, "eval/codebook_perplexity": 300.0,
                "eval/distractors_equal_target": 0.01}
    runs = [_w2v_run(out, norm, learning, learning)[0] for norm in ("layernorm", "dyt")]
    config = load_config(Wav2Vec2PretrainConfig, WAV2VEC2_TINY)
    monkeypatch.setattr(compare, "plan_runs", lambda spec, args, models, seeds: [argparse.Namespace(config=config)])
    monkeypatch.setattr(compare, "eval_speech", lambda data: tmp_path / "speech")
    monkeypatch.setattr(compare, "speech_identity", lambda folder: "manifests-v1")
    monkeypatch.setattr(compare, "Wav2Vec2PretrainTask", lambda config: None)
    monkeypatch.setattr(compare, "prepare_out", lambda args: None)
    monkeypatch.setattr(compare, "train_runs", lambda spec, args, plan: runs)
    computed, kill = [], {}

    class Killed(Exception):
        pass

    def eval_results(name, run_dir, data, seeds, steps, ctc, pretrained, device):
        for seed in seeds:
            done = (run_dir.name, name, seed, pretrained)
            if kill.get("at") == done:
                raise Killed
            computed.append(done)
            yield _w2v_evals(random.Random(str(done)), [seed])[name][0]

    monkeypatch.setattr(compare, "eval_results", eval_results)

    def main(*options):
        return compare.main(["--out", str(out), "--launcher", "python", "--nproc", "1", "--device", "cpu",
                             *options]).read_text()

    kill["at"] = ("dyt", "probe", 1, True)
    with pytest.raises(Killed):
        main("--evals", "contrastive", "probe", "--seeds", "0", "1")
    assert computed == [("layernorm", "contrastive", 0, True), ("layernorm", "contrastive", 1, True),
                        ("layernorm", "probe", 0, True), ("layernorm", "probe", 1, True),
                        ("dyt", "contrastive", 0, True), ("dyt", "contrastive", 1, True), ("dyt", "probe", 0, True)]
    stored = json.loads((out / "dyt" / "eval-probe.json").read_text())["seeds"]
    assert stored.keys() == {"0"} and stored["0"]["device"] == "cpu"  # where it ran, beside its numbers
    kill.clear()
    computed.clear()
    first = main("--evals", "contrastive", "probe", "--seeds", "0", "1")
    assert computed[0] == ("dyt", "probe", 1, True) and all(not pretrained for *_, pretrained in computed[1:])
    assert len(computed) == 1 + 2 * 2 * 2  # random init: each cell's first run, both evals, both seeds
    computed.clear()
    assert main("--evals", "contrastive", "probe", "--seeds", "0", "1") == first and computed == []
    main("--evals", "contrastive", "probe", "ctc", "--seeds", "0", "1", "2")
    assert sorted({(name, seed) for _, name, seed, _ in computed}) == [
        ("contrastive", 2), ("ctc", 0), ("ctc", 1), ("ctc", 2), ("probe", 2)]
    # the speech rebuilt (another build's key): every eval is made again, not reused
    assert json.loads((out / "dyt" / "eval-probe.json").read_text())["settings"]["speech"] == "manifests-" + "v1"
    monkeypatch.setattr(compare, "speech_identity", lambda folder: "manifests-v2")
    computed.clear()
    main("--evals", "probe", "--seeds", "0")
    assert sorted({(run, name, seed) for run, name, seed, _ in computed}) == [("dyt", "probe", 0), ("layernorm", "probe", 0)]
