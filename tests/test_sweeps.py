"""Sweeps, recipe descriptions and verdicts of the shared comparison (dyt.train.compare).

The sweep runs train the toy recipe for real (checkpoints, metrics, --resume) but in this process:
``subprocess.run`` of the launch is replaced by ``run_recipe`` on the same arguments, which counts
the launches and skips the seconds each new interpreter would take to import deepspeed."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from dyt.train import compare as shared
from dyt.train import load_config, read_metrics, run_recipe
from dyt.train.compare import (
    NO_VERDICT,
    Point,
    add_run_arguments,
    baseline_cell,
    grid,
    parse_run_arguments,
    plan_runs,
    prepare_out,
    read_point,
    sweep_section,
    train_runs,
    verdict,
)
from dyt.train.recipe import Metric, ModelSpec, RecipeSpec

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from toy_recipe import ToyConfig, ToyTask  # noqa: E402

TOY = RecipeSpec(name="toy", title="Toy", package="toy_recipe", train_module="toy_recipe", compare_module="-",
                 config_class=ToyConfig, models=(ModelSpec("toy", "Toy", "-", ("layernorm", "dyt")),),
                 summarize=shared.pretraining_summary, metrics=(Metric("eval_loss", "validation loss"),))


def _args(spec: RecipeSpec, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="toy-compare")
    add_run_arguments(parser, spec)
    return parse_run_arguments(parser, argv)


@pytest.fixture
def launches(monkeypatch):
    """Every launch of a toy run, trained in this process; the list of launch commands."""
    made = []

    def run_in_process(cmd, env, check):
        assert cmd[:3] == [sys.executable, "-m", "toy_recipe"], cmd
        made.append(cmd)
        try:
            run_recipe(ToyConfig, ToyTask, cmd[3:])
        except SystemExit as error:  # a launched run's failure is its exit status
            raise subprocess.CalledProcessError(error.code, cmd) from error

    monkeypatch.setattr(shared, "subprocess", SimpleNamespace(run=run_in_process,  # this module's launches only
                                                              CalledProcessError=subprocess.CalledProcessError))
    return made


def _toy_config(tmp_path: Path) -> Path:
    config = tmp_path / "toy.yaml"
    config.write_text("model:\n  norm: {kind: dyt}\ntrain:\n  steps: 4\n  save_every: 2\n  eval_every: 2\n"
                      "  micro_batch_size: 16\n  warmup_steps: 1\n  progress: false\n  log_every: 1\n")
    return config


# ---------------------------------------------------------------- a 2 x 2 sweep end to end


def test_machine_checks_cover_the_runs_still_to_train(tmp_path, launches, monkeypatch):
    """A DyT backend this machine cannot run stops a comparison before any launch, not after the
    baseline's runs trained; a comparison whose runs are all finished (a report rebuilt on another
    machine) needs none, unless ``--fresh`` trains them again."""
    from dyt.train import ConfigError

    config = _toy_config(tmp_path)
    argv = ["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1", "--norms", "layernorm", "dyt"]
    monkeypatch.setenv("DYT_BACKEND", "fused")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="DYT_BACKEND .*'fused' cannot run on cpu"):
        plan_runs(TOY, _args(TOY, argv), [(TOY.models[0], config)], seeds=[0])
    assert not launches
    monkeypatch.delenv("DYT_BACKEND")
    args = _args(TOY, argv)
    prepare_out(args)  # as the commands do: the comparison's lock file marks --out as its own for --fresh
    train_runs(TOY, args, plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0]))
    assert len(launches) == 2
    monkeypatch.setenv("DYT_BACKEND", "fused")
    train_runs(TOY, args, plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0]))  # finished: nothing to run here
    assert len(launches) == 2
    with pytest.raises(ConfigError, match="DYT_BACKEND"):
        plan_runs(TOY, _args(TOY, [*argv, "--fresh"]), [(TOY.models[0], config)], seeds=[0])


def test_a_folder_holding_another_run_stops_the_comparison_before_any_launch(tmp_path, launches):
    """A planned run's folder whose point.json names another run (or no run: a file cut short) is
    found before the first launch, not after the runs planned before it trained."""
    from dyt.train.compare import CompareError

    config = _toy_config(tmp_path)
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1", "--norms", "layernorm",
                       "dyt"])
    plan = plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0])
    prepare_out(args)
    plan[-1].dir.mkdir(parents=True)
    (plan[-1].dir / "point.json").write_text(json.dumps(plan[0].point.to_json()))
    with pytest.raises(CompareError, match="holds the run"):
        train_runs(TOY, args, plan)
    (plan[-1].dir / "point.json").write_text('{"norm": "dy')
    with pytest.raises(CompareError, match=r"point.json is not the JSON of a run's point"):
        train_runs(TOY, args, plan)
    assert not launches


def test_two_by_two_sweep_makes_four_resumable_runs_a_table_and_a_heatmap(tmp_path, launches):
    config = _toy_config(tmp_path)
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1", "--norms", "dyt",
                       "--sweep", "model.norm.alpha_init.default=0.25,2", "--sweep", "train.lr=0.001,0.03"])
    plan = plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0])
    prepare_out(args)
    runs = train_runs(TOY, args, plan)

    assert len(launches) == 4 and len({run.dir for run in runs}) == 4
    # values as the settings they make: "2" of a float setting is 2.0
    expected = [(("model.norm.alpha_init.default", a), ("train.lr", lr)) for a in ("0.25", "2.0") for lr in ("0.001", "0.03")]
    assert [run.point.sweep for run in runs] == expected
    for run in runs:
        assert read_point(run.dir) == run.point  # the facts, saved beside the run
        trained = load_config(ToyConfig, run.dir / "config.yaml", check_files=False)
        swept = dict(run.point.sweep)
        assert trained.model.norm.alpha_init == {"default": float(swept["model.norm.alpha_init.default"])}
        assert trained.train.lr == float(swept["train.lr"]) and trained.train.seed == 0
        rows = read_metrics(run.dir / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        # alpha starts where the sweep put it (one step of AdamW moves it by about lr, at most 0.03 here)
        assert rows[0]["alpha/1"] == pytest.approx(float(swept["model.norm.alpha_init.default"]), abs=0.05)
        assert shared.finished_step(run.dir) == 4

    # the report: a 2 x 2 table of the validation loss, a heatmap, the best point
    summaries = {run.point: TOY.summarize(run) for run in runs}
    values = {p.cell: {"eval_loss": [s["eval_loss"]]} for p, s in summaries.items()}
    lines = sweep_section(args.out, TOY.models[0], values, TOY.metrics, args.sweeps)
    text = "\n".join(lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("| model.norm.alpha_init.default \\ train.lr |"))
    assert lines[header] == "| model.norm.alpha_init.default \\ train.lr | 0.001 | 0.03 |"
    for offset, alpha in enumerate(("0.25", "2.0"), start=2):
        cells = [f"{summaries[Point('dyt', 0, 'toy', (('model.norm.alpha_init.default', alpha), ('train.lr', lr)))]['eval_loss']:.3f}"
                 for lr in ("0.001", "0.03")]
        assert lines[header + offset] == f"| {alpha} | {cells[0]} | {cells[1]} |"
    heatmap = args.out / "sweep_toy_dyt_eval_loss.png"
    assert heatmap.read_bytes()[:4] == b"\x89PNG" and f"]({heatmap.name})" in text
    best = min(summaries, key=lambda p: summaries[p]["eval_loss"])
    assert (f"Best validation loss for dyt: model.norm.alpha_init.default={dict(best.sweep)['model.norm.alpha_init.default']}, "
            f"train.lr={dict(best.sweep)['train.lr']} ({summaries[best]['eval_loss']:.3f}, 1 seed(s)).") in text

    # a relaunch trains nothing: no launch, not a byte of the metrics changes
    before = {run.dir: (run.dir / "metrics.jsonl").read_bytes() for run in runs}
    again = train_runs(TOY, args, plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0]))
    assert len(launches) == 4
    assert [r.wall_s for r in again] == [r.wall_s for r in runs]
    assert all((run.dir / "metrics.jsonl").read_bytes() == before[run.dir] for run in runs)
    # nor do the same settings spelled otherwise, their --sweep options in the other order
    respelled = _args(TOY, ["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1", "--norms", "dyt",
                            "--sweep", "train.lr=1e-3,3e-2", "--sweep", "model.norm.alpha_init.default=.25,2"])
    again = train_runs(TOY, respelled, plan_runs(TOY, respelled, [(TOY.models[0], config)], seeds=[0]))
    assert len(launches) == 4 and sorted(r.dir for r in again) == sorted(r.dir for r in runs)

    # runs trained before folders were named by the settings (values as given, keys in the order given)
    # are moved to their folders, not trained again
    for run in runs:
        as_given = dataclasses.replace(run.point, sweep=tuple((k, "2" if v == "2.0" else v) for k, v in run.point.sweep))
        if as_given.legacy_dir_name() != run.dir.name:
            run.dir.rename(args.out / as_given.legacy_dir_name())
            (args.out / as_given.legacy_dir_name() / "point.json").write_text(json.dumps(as_given.to_json()))
    assert sum(not run.dir.exists() for run in runs) == 2
    as_before = _args(TOY, ["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1", "--norms", "dyt",
                            "--sweep", "model.norm.alpha_init.default=0.25,2", "--sweep", "train.lr=0.001,0.03"])
    again = train_runs(TOY, as_before, plan_runs(TOY, as_before, [(TOY.models[0], config)], seeds=[0]))
    assert len(launches) == 4 and all(run.dir.is_dir() and read_point(run.dir) == run.point for run in runs)
    assert sorted(p.name for p in args.out.iterdir() if p.is_dir()) == sorted(run.dir.name for run in runs)

    # a run killed after its step-2 checkpoint: only that one is launched, and it resumes
    killed = runs[1].dir
    shutil.rmtree(killed / "checkpoints" / "step_00000004")
    train_runs(TOY, args, plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0]))
    assert len(launches) == 5 and f"train.out_dir={killed}" in launches[-1] and "--resume" in launches[-1]
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert shared.finished_step(killed) == 4


def test_a_diverged_run_is_reported_and_the_comparison_goes_on(tmp_path, launches, capsys):
    """A sweep point whose training loss goes NaN (as a too-large alpha0 or learning rate does) made
    the launch fail and stopped the whole comparison, every later point untrained. It is now a run
    reported as diverged (its numbers NaN: named, no verdict, ranked last), and a relaunch with the
    same settings does not launch it again."""
    config = _toy_config(tmp_path)
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1", "--norms", "dyt",
                       "--sweep", "data.nan_at_step=3,0"])
    plan = plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0])
    prepare_out(args)
    runs = train_runs(TOY, args, plan)
    assert len(launches) == 2 and "diverged at step 3 (training loss nan); reported as diverged" in capsys.readouterr().out
    diverged, trained = runs
    assert diverged.diverged["step"] == 3 and diverged.diverged["last_good"].endswith("step_00000002")
    assert trained.diverged is None and shared.finished_step(trained.dir) == 4
    summaries = {run.point: TOY.summarize(run) for run in runs}
    assert math.isnan(summaries[diverged.point]["eval_loss"]) and summaries[diverged.point]["diverged_at"] == 3
    assert math.isfinite(summaries[trained.point]["eval_loss"])
    values = {p.cell: {"eval_loss": [s["eval_loss"]]} for p, s in summaries.items()}
    lines = sweep_section(args.out, TOY.models[0], values, TOY.metrics, args.sweeps)
    assert any(line.startswith("Best validation loss for dyt: data.nan_at_step=0 (") for line in lines), lines
    assert shared.divergence_notes(runs)[2] == (
        f"- dyt (data.nan_at_step=3), seed 0: training loss nan at step 3 (last complete checkpoint: "
        f"{diverged.diverged['last_good']})")
    assert shared.divergence_notes([trained]) == []
    assert shared.fine_tuned_runs(runs, pretrained=True) == [trained]

    again = train_runs(TOY, args, plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0]))
    assert len(launches) == 2 and "not launched again" in capsys.readouterr().out
    assert [run.diverged for run in again] == [run.diverged for run in runs]
    # with a setting that changes the numbers, the record is another launch's: this one may not diverge
    other = load_config(ToyConfig, config, [*plan[0].overrides, "train.lr=0.0001", f"train.out_dir={diverged.dir}"])
    assert shared.divergence_of(other, 1, None) is None and shared.divergence_of(plan[0].config, 2, None) is None
    assert shared.divergence_of(plan[0].config, 1, None)["step"] == 3
    # nor with other data files than the launch that diverged recorded
    (diverged.dir / "data_files.json").write_text(json.dumps({"digest": "then", "files": 1, "bytes": 1}))
    assert shared.divergence_of(plan[0].config, 1, {"digest": "now", "files": 1, "bytes": 1}) is None
    assert shared.divergence_of(plan[0].config, 1, {"digest": "then", "files": 1, "bytes": 1})["step"] == 3


def test_sweep_report_one_key_charts_three_keys_table_only(tmp_path):
    model = TOY.models[0]
    metric = Metric("acc", "accuracy", higher_is_better=True)
    one = [shared.parse_sweep("train.lr=1,2,3")]
    values = {("toy", "dyt", (("train.lr", v),)): {"acc": [a, a + 0.02, a + 0.04]} for v, a in (("1", 0.5), ("2", 0.7), ("3", 0.6))}
    values[("toy", "layernorm", ())] = {"acc": [0.1, 0.2, 0.3]}  # not swept: no table of its own
    lines = sweep_section(tmp_path, model, values, [metric], one)
    assert lines[2:7] == ["| train.lr | accuracy |", "|---|---|", "| 1 | 0.520 ± 0.020 |", "| 2 | 0.720 ± 0.020 |",
                          "| 3 | 0.620 ± 0.020 |"]
    assert (tmp_path / "sweep_toy_dyt_acc.png").read_bytes()[:4] == b"\x89PNG"
    assert "Best accuracy for dyt: train.lr=2 (0.720 ± 0.020, 3 seed(s))." in lines
    assert not any("layernorm" in line for line in lines)

    three = [shared.parse_sweep(f"{key}=1,2") for key in ("train.lr", "train.steps", "model.width")]
    points = grid(three, "dyt")
    values = {("toy", "dyt", p): {"acc": [i / 10]} for i, p in enumerate(points)}
    lines = sweep_section(tmp_path / "three", model, values, [metric], three)
    assert "| train.lr | train.steps | model.width | accuracy |" in lines and "| 2 | 2 | 2 | 0.700 |" in lines
    assert not (tmp_path / "three").exists()  # no chart for three keys
    assert "Best accuracy for dyt: train.lr=2, train.steps=2, model.width=2 (0.700, 1 seed(s))." in lines


def test_a_run_trained_with_other_settings_is_refused_before_any_launch(tmp_path, launches, capsys):
    """A run in ``--out`` whose model, optimizer, schedule, batches, validation examples or number of
    ranks differ from the comparison's would be reported beside runs trained as planned: refused
    before anything trains. More steps too: a run trained on a 4-step schedule and continued is not a
    6-step run. A cadence that changes no number (keep_checkpoints) leaves the finished run reported
    as trained."""
    config = _toy_config(tmp_path)

    def compare(*extra, launch=("python", "1")):
        args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--launcher", launch[0], "--nproc", launch[1], "--norms", "dyt",
                           *extra])
        return train_runs(TOY, args, plan_runs(TOY, args, [(TOY.models[0], config)], seeds=[0, 1]))

    compare()
    with pytest.raises(shared.CompareError, match=r"dyt-seed0 was trained with other settings than this comparison's: "
                                                  r"model\.width 16 -> 8 \(launch at step 0\); train\.lr 0\.0003 -> 0\.001 "
                                                  r"\(launch at step 0\); put them back"):
        compare("--set", "train.lr=0.001", "--set", "model.width=8")
    for changed in ("train.steps=6", "train.micro_batch_size=4", "train.eval_batches=1", "train.warmup_steps=2",
                    "train.log_every=2"):
        with pytest.raises(shared.CompareError, match=rf"dyt-seed0 was trained with other settings than this "
                                                      rf"comparison's: {changed.split('=')[0]}"):
            compare("--set", changed)
    with pytest.raises(shared.CompareError, match=r"other settings than this comparison's: ranks 1 -> 2 \(launch at step 0\); "
                                                  r"put them back"):
        compare(launch=("torchrun", "2"))
    launched = tmp_path / "cmp" / "toy-dyt-seed0" / "launches.jsonl"
    kept = launched.read_text()
    launched.unlink()  # a run from before launches were recorded: its config.yaml and checkpoint marker
    with pytest.raises(shared.CompareError, match=r"other settings than this comparison's: ranks 1 -> 2; put them back"):
        compare(launch=("torchrun", "2"))
    with pytest.raises(shared.CompareError, match=r"other settings than this comparison's: train\.steps 4 -> 6; put"):
        compare("--set", "train.steps=6")
    launched.write_text(kept)
    assert len(launches) == 2
    capsys.readouterr()
    compare("--set", "train.keep_checkpoints=3")  # a finished run is reported as trained, the note says with what
    assert len(launches) == 2
    assert "note: trained with train.keep_checkpoints 2 -> 3 (old -> this comparison's)" in capsys.readouterr().out

    # continued by hand to 6 steps: its config.yaml now says 6, but its first 4 steps had a 4-step schedule
    run_dir = tmp_path / "cmp" / "toy-dyt-seed0"
    run_recipe(ToyConfig, ToyTask, ["--config", str(config), "--set", "train.seed=0", "--set", f"train.out_dir={run_dir}",
                                    "--set", "train.steps=6", "--resume"])
    with pytest.raises(shared.CompareError, match=r"dyt-seed0 was trained with other settings than this comparison's: "
                                                  r"train\.steps 4 -> 6 \(launch at step 0\); put them back"):
        compare("--set", "train.steps=6")


# ---------------------------------------------------------------- the sweep grammar and grid


def test_sweep_options_build_a_grid_per_norm():
    # a --set of a key swept for one norm is the other norms' value
    assert _args(TOY, ["--set", "train.lr=5e-3", "--sweep", "dyt:train.lr=1e-3,2e-3"]).overrides == ["train.lr=5e-3"]
    args = _args(TOY, ["--norms", "layernorm", "dyt", "--sweep", "train.lr=1e-3,2e-3,4e-3",
                       "--sweep", "dyt:model.norm.alpha_init.ffn=0.2,0.5"])
    assert [s.norm for s in args.sweeps] == [None, "dyt"]
    assert len(grid(args.sweeps, "layernorm")) == 3 and len(grid(args.sweeps, "dyt")) == 6
    assert grid(args.sweeps, "dyt")[1] == (("train.lr", "1e-3"), ("model.norm.alpha_init.ffn", "0.5"))
    assert grid([], "dyt") == [()]
    # a variant's name may hold a colon; the key is what follows the last one
    variant = shared.parse_sweep("dyt:hardtanh:train.lr=1,2")
    assert (variant.norm, variant.key, variant.values) == ("dyt:hardtanh", "train.lr", ("1", "2"))


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "train.lr"], "is not [NORM:]KEY=V1,V2"),
    (["--sweep", "train.lr=1,,2"], "is not [NORM:]KEY=V1,V2"),
    (["--sweep", "train.lr=1,1"], "lists a value twice"),
    (["--sweep", "train.lr=1,2", "--sweep", "dyt:train.lr=3,4"], "swept twice"),
    (["--norms", "dyt", "--sweep", "rmsnorm:train.lr=1,2"], "names a norm that is not trained"),
    (["--norms", "dyt", "dyt"], "listed twice"),
    (["--norms", "layernorm", "--norms", "dyt"], "argument --norms: given twice: list every value after one --norms"),
    (["--norms", "layernorm", "dyt", "dyt:tanh"], "argument --norms: dyt and dyt:tanh are the same norm"),
    (["--norms", "dyt:sigmoid:fixed-alpha", "dyt:fixed-alpha:sigmoid"], "dyt:sigmoid:fixed-alpha and "
     "dyt:fixed-alpha:sigmoid are the same norm (model.norm.kind=dyt model.norm.squash=sigmoid"),
    (["--set", "train.steps=5", "--set", "train.steps = 7"], "argument --set: train.steps is set twice"),
    (["--set", "train.lr=5e-3", "--sweep", "train.lr=1e-3,2e-3"], "argument --set: train.lr is also swept"),
    (["--norms", "dyt", "--set", "train.lr=5e-3", "--sweep", "dyt:train.lr=1e-3,2e-3"], "train.lr is also swept"),
    (["--norms", "dyt", "rmsnorm", "--set", "train.lr=5e-3", "--sweep", "dyt:train.lr=1e-3,2e-3",
      "--sweep", "rmsnorm:train.lr=1e-3,4e-3"], "train.lr is also swept"),
    (["--sweep", "train.betas=[0.9,0.95],[0.9,0.99]"], "the values are split at every comma, so a list or mapping"),
    (["--sweep", "train.seed=0,1,2"], "train.seed is set for each run by the comparison itself"),
    (["--set", "train.out_dir=x"], "train.out_dir is set for each run by the comparison itself"),
    (["--set", "train={seed: 5, steps: 7}"], "train (it holds train.seed) is set for each run by the comparison"),
    (["--set", "model={norm: {kind: dyt}}"], "model (it holds model.norm) is what each --norms entry sets"),
])
def test_bad_sweep_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _args(TOY, argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_more_ranks_than_cuda_devices_is_refused_for_runs_to_train(tmp_path, monkeypatch, launches):
    """On CUDA each rank takes a device: rank 1 of 2 on a one-GPU machine would fail, after the data
    is built, on a device ordinal that is not there. Checked when the runs are planned, for the ones
    to train (a finished comparison's report needs no GPU), with the grad_accum that keeps the batch."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(shared.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shared.torch.cuda, "device_count", lambda: 1)
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--nproc", "2", "--set", "train.grad_accum=3"])
    with pytest.raises(shared.CompareError, match=(
            r"--nproc 2: this machine has 1 CUDA device\(s\) and each rank takes one: give --nproc 1 or fewer "
            r"\(--set train.grad_accum=6 keeps the 2-rank global batch")):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--nproc", "2", "--set", "train.global_batch_size=64"])
    with pytest.raises(shared.CompareError, match=r"\(train.global_batch_size keeps the batch on any rank count"):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    assert len(plan_runs(TOY, _args(TOY, ["--out", str(tmp_path / "cmp"), "--nproc", "1"]),
                         [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])) == 2
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # CPU ranks on a GPU machine share the cores
    assert len(plan_runs(TOY, _args(TOY, ["--out", str(tmp_path / "cmp"), "--nproc", "2"]),
                         [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])) == 2
    assert launches == [] and not (tmp_path / "cmp").exists()


def test_a_bad_sweep_key_stops_before_any_launch(tmp_path, launches):
    from dyt.train import ConfigError

    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1",
                       "--sweep", "model.norm.alpha_init.ffn=0.5,1", "--sweep", "train.lrr=1,2"])
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    assert launches == [] and not (tmp_path / "cmp").exists()
    # a norm prefix no run trains (the default norms here: layernorm, dyt)
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--sweep", "rmsnorm:train.lr=1,2"])
    with pytest.raises(shared.CompareError, match="rmsnorm:train.lr names a norm no run trains"):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    # settings checked against each other at each point of the grid, not each value alone against the file
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--sweep", "train.lr=1e-4,2e-4", "--sweep", "train.min_lr=0,1e-5"])
    assert len(plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])) == 8  # 2 norms x 4 points
    # two spellings of one setting: one run, asked for twice
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--sweep", "train.lr=1e-3,0.002,0.001"])
    with pytest.raises(shared.CompareError, match=r"--sweep train.lr: 1e-3 and 0.001 are the same setting \(0.001\)"):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    # a norm setting swept for every norm where one of them builds no layer that reads it: that norm's
    # points would all train one model
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--sweep", "model.norm.alpha_init.default=0.5,1"])
    with pytest.raises(shared.CompareError, match=(
            r"--sweep model.norm.alpha_init.default: the layernorm runs build no layer that reads model.norm.alpha_init "
            r"\(a dyt setting\), so its 2 points would train one model 2 times: sweep it for the norms that read "
            r"it, e.g. --sweep dyt:model.norm.alpha_init.default=0.5,1")):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--sweep", "model.norm.eps=1e-5,1e-6"])
    with pytest.raises(shared.CompareError, match=r"the dyt runs build no layer that reads model.norm.eps \(a "
                                                  r"layernorm or rmsnorm setting\)"):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    # the same restricted to a norm that reads no such setting
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--sweep", "layernorm:model.norm.alpha_init.default=0.5,1"])
    with pytest.raises(shared.CompareError, match=(
            r"--sweep layernorm:model.norm.alpha_init.default: the layernorm runs build no layer that reads "
            r"model.norm.alpha_init .*e.g. --sweep dyt:model.norm.alpha_init.default=0.5,1")):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--norms", "layernorm",
                       "--sweep", "layernorm:model.norm.alpha_init.default=0.5,1"])
    with pytest.raises(shared.CompareError, match="no norm of this comparison reads it: drop the sweep"):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--sweep", "dyt:model.norm.alpha_init.default=0.5,1",
                       "--sweep", "model.norm.bias=false,true"])  # both norms read bias
    assert len(plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])) == 2 + 4
    assert launches == [] and not (tmp_path / "cmp").exists()


def test_norms_take_ablation_variants_and_baselines(tmp_path):
    """--norms resolves every entry through dyt.norm_variant_overrides: DyT variants get their
    options, baselines their kind, each in a folder of its own; an unknown name stops the plan."""
    from dyt.errors import UserInputError

    norms = ["layernorm", "dyt", "dyt:hardtanh", "dyt:sigmoid:fixed-alpha", "dyt:channel-alpha", "skipinit"]
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--norms", *norms])
    plan = plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])
    got = {p.point.norm: p.config.model.norm for p in plan}
    assert list(got) == norms and len({p.dir for p in plan}) == len(norms)
    assert (got["dyt"].kind, got["dyt"].squash, got["dyt"].learnable_alpha) == ("dyt", "tanh", True)
    assert (got["dyt:hardtanh"].kind, got["dyt:hardtanh"].squash) == ("dyt", "hardtanh")
    assert (got["dyt:sigmoid:fixed-alpha"].squash, got["dyt:sigmoid:fixed-alpha"].learnable_alpha) == ("sigmoid", False)
    assert got["dyt:channel-alpha"].alpha_shape == "channel" and got["skipinit"].kind == "skipinit"
    args = _args(TOY, ["--out", str(tmp_path / "cmp"), "--norms", "layernorm", "dyt:softsign"])
    with pytest.raises(UserInputError, match="softsign"):
        plan_runs(TOY, args, [(TOY.models[0], _toy_config(tmp_path))], seeds=[0])


def test_point_folders_differ_for_every_point_and_facts_never_come_from_names():
    points = [Point("dyt", 0, "llama", (("model.norm.alpha_init.attention", a), ("model.norm.alpha_init.ffn", f)))
              for a in ("0.5", "1") for f in ("0.5", "1")]
    points += [Point("dyt", 0, "llama", (("train.lr", "0.5"),)), Point("dyt", 1, "llama"), Point("rmsnorm", 0, "llama")]
    assert len({p.dir_name() for p in points}) == len(points)
    assert all("/" not in p.dir_name() for p in points + [Point("dyt", 0, "x", (("data.corpus", "/a/b"),))])
    assert all(Point.from_json(json.loads(json.dumps(p.to_json()))) == p for p in points)


# ---------------------------------------------------------------- verdicts in words


@pytest.mark.parametrize("dyt, baseline, higher, words", [
    ([4.95, 4.96, 4.94], [4.94, 4.96, 4.95], False, "within rmsnorm's mean ± 2σ [4.930, 4.970]"),
    ([5.10, 5.11, 5.12], [4.94, 4.96, 4.95], False, "worse than rmsnorm's mean ± 2σ [4.930, 4.970]"),
    ([4.80, 4.81, 4.82], [4.94, 4.96, 4.95], False, "better than rmsnorm's mean ± 2σ [4.930, 4.970]"),
    ([0.80, 0.81, 0.82], [0.50, 0.52, 0.54], True, "better than rmsnorm's mean ± 2σ [0.480, 0.560]"),
    ([0.30, 0.31, 0.32], [0.50, 0.52, 0.54], True, "worse than rmsnorm's mean ± 2σ [0.480, 0.560]"),
    ([0.56, 0.56, 0.56], [0.50, 0.52, 0.54], True, "within rmsnorm's mean ± 2σ [0.480, 0.560]"),  # the edge is in
    ([0.24, 0.25, 0.26], [0.25, 0.25, 0.25], True,  # the baseline stuck on one value: σ of DyT's seeds
     "within rmsnorm's mean ± 2σ [0.230, 0.270] (σ of this row's seeds: the baseline's all agree)"),
    ([0.80, 0.80, 0.80], [0.25, 0.25, 0.25], True,
     "better than rmsnorm's mean ± 2σ [0.250, 0.250] (σ of this row's seeds: the baseline's all agree)"),
    ([4.95, 4.96], [4.94, 4.96, 4.95], False, NO_VERDICT),
    ([4.95, 4.96, 4.97], [4.94, 4.96], False, NO_VERDICT),
    ([4.95], [4.95], False, NO_VERDICT),
])
def test_verdict_in_words(dyt, baseline, higher, words):
    assert verdict(dyt, baseline, higher_is_better=higher, baseline_name="rmsnorm") == words
    assert NO_VERDICT == "fewer than 3 seeds: no verdict"


@pytest.mark.parametrize("pretrained, untrained, higher, words", [
    ([0.60, 0.62, 0.64], [0.50, 0.51, 0.52], True, "+0.110, better than random init"),
    ([0.25, 0.26, 0.24], [0.25, 0.24, 0.26], True, "+0.000, within random init's ± 2σ (0.020): no gain"),
    ([0.40, 0.40, 0.40], [0.50, 0.51, 0.52], True, "-0.110, worse than random init"),
    ([0.40, 0.41, 0.42], [0.50, 0.51, 0.52], False, "-0.100, better than random init"),  # a CER: lower is better
    ([0.24, 0.25, 0.26], [0.25, 0.25, 0.25], True, "+0.000, within the pretrained runs' ± 2σ (0.020): no gain"),
    ([0.60, 0.62], [0.50, 0.51, 0.52], True, NO_VERDICT),
])
def test_what_pretraining_bought_in_words(pretrained, untrained, higher, words):
    assert shared.pretraining_gain(pretrained, untrained, higher_is_better=higher) == words


def test_each_point_is_judged_against_the_baseline_point_it_shares_keys_with():
    lr = lambda v: ("train.lr", v)  # noqa: E731
    alpha = lambda v: ("model.norm.alpha_init.ffn", v)  # noqa: E731
    cells = [("m", "rmsnorm", (lr("1"),)), ("m", "rmsnorm", (lr("2"),)),
             ("m", "dyt", (lr("1"), alpha("0.5"))), ("m", "dyt", (lr("2"), alpha("0.5")))]
    assert baseline_cell(cells[3], cells, "rmsnorm") == cells[1]  # same lr
    # the baseline swept its own lr (rmsnorm:train.lr) and DyT none: judged against the baseline's best lr
    own = [("m", "rmsnorm", (lr("1"),)), ("m", "rmsnorm", (lr("2"),)), ("m", "dyt", ())]
    losses = {own[0]: 5.0, own[1]: 4.0}
    assert baseline_cell(own[2], own, "rmsnorm", losses.get) == own[1]
    assert baseline_cell(own[2], own, "rmsnorm", losses.get, higher_is_better=True) == own[0]
    assert baseline_cell(("other", "dyt", ()), own, "rmsnorm") is None
    # each norm tuned its own lr (rmsnorm:train.lr=1,2 beside dyt:train.lr=2,4): a tuned key is never
    # paired by value, so every DyT point meets the baseline's best lr (before: DyT lr=2 met the
    # baseline's lr=2 and lr=4 none at all, or the best, by whether the values overlapped)
    tuned = [*own[:2], ("m", "dyt", (lr("2"),)), ("m", "dyt", (lr("4"),))]
    for dyt_point in tuned[2:]:
        assert baseline_cell(dyt_point, tuned, "rmsnorm", losses.get, tuned={"train.lr"}) == own[1]
    assert baseline_cell(tuned[2], tuned, "rmsnorm", losses.get) == own[1]  # paired: the same lr, 2
    assert baseline_cell(tuned[3], tuned, "rmsnorm", losses.get) is None  # paired, and no baseline lr 4
    # with a sweep of every norm beside it, that key still pairs the points
    both = [("m", "rmsnorm", (alpha("1"), lr("1"))), ("m", "rmsnorm", (alpha("1"), lr("2"))),
            ("m", "rmsnorm", (alpha("2"), lr("1"))), ("m", "rmsnorm", (alpha("2"), lr("2"))),
            ("m", "dyt", (alpha("2"), lr("10")))]
    scores = {both[0]: 1.0, both[1]: 2.0, both[2]: 4.0, both[3]: 3.0}
    assert baseline_cell(both[4], both, "rmsnorm", scores.get, tuned={"train.lr"}) == both[3]
    args = _args(TOY, ["--norms", "layernorm", "dyt", "--sweep", "layernorm:train.lr=1,2", "--sweep", "dyt:train.lr=2,4",
                       "--sweep", "model.norm.alpha_init.default=1,2"])
    assert shared.tuned_keys(args) == {"train.lr"}


def test_verdicts_never_choose_on_test_numbers_nor_judge_one_checkpoint_per_norm(tmp_path):
    """The baseline swept a key of its own: its point is chosen by the validation metric, whatever the
    test numbers say; a sweep of a test metric names no best point; downstream values from one
    pretraining run per norm (its fine-tuning seeds) give no verdict between norms."""
    lr = lambda v: ("train.lr", v)  # noqa: E731
    cells = [("m", "rmsnorm", (lr("1"),)), ("m", "rmsnorm", (lr("2"),)), ("m", "dyt", ())]
    test = {cells[0]: [0.90, 0.91, 0.92], cells[1]: [0.60, 0.61, 0.62], cells[2]: [0.70, 0.71, 0.72]}
    validation_loss = {cells[0]: [2.0, 2.0, 2.0], cells[1]: [1.0, 1.0, 1.0], cells[2]: [1.5, 1.5, 1.5]}
    assert shared.judge(cells[2], test, "rmsnorm", higher_is_better=True).startswith("worse")  # vs lr 1, best on test
    chosen = shared.judge(cells[2], test, "rmsnorm", higher_is_better=True, choose_by=validation_loss)
    assert chosen.startswith("better") and "[0.590, 0.630]" in chosen  # vs lr 2, best on validation
    assert shared.judge(cells[2], test, "rmsnorm", higher_is_better=True, choose_by=validation_loss,
                        pretrainings=1) == shared.ONE_PRETRAINING
    assert shared.judge(cells[2], test, "rmsnorm", higher_is_better=True, pretrainings=3).startswith("worse")

    model = TOY.models[0]
    values = {(model.name, *c[1:]): {"acc": v} for c, v in test.items()}
    sweeps = [shared.parse_sweep("rmsnorm:train.lr=1,2")]
    lines = sweep_section(tmp_path, model, values, [Metric("acc", "test accuracy", higher_is_better=True, test=True)],
                          sweeps)
    assert "| 1 | 0.910 ± 0.010 |" in lines and not any(line.startswith("Best") for line in lines)
    assert "test accuracy is a test number: no point is chosen on it" in "\n".join(lines)
    lines = sweep_section(tmp_path, model, values, [Metric("acc", "accuracy", higher_is_better=True)], sweeps)
    assert "Best accuracy for rmsnorm: train.lr=1 (0.910 ± 0.010, 3 seed(s))." in lines


def test_seeds_that_are_not_finite_are_named_not_a_crash_nor_a_winner(tmp_path):
    """A seed whose validation diverged (NaN, inf) made ``statistics`` raise while the report was
    written, after every run had trained; and a NaN cell won or lost a ranking by its place."""
    nan, inf = float("nan"), float("inf")
    assert shared.mean_std([4.0, nan, 5.0]) == "4.500 ± 0.707 (1 of 3 seeds not finite)"
    assert shared.mean_std([inf]) == "(1 of 1 seeds not finite)"
    assert verdict([4.9, nan, 4.8], [5.0, 5.1, 5.2], higher_is_better=False, baseline_name="rmsnorm") == (
        "no verdict: not finite in 1 of 3 seeds of this row")
    assert verdict([4.9, 4.8, 4.7], [5.0, inf, nan], higher_is_better=False, baseline_name="rmsnorm") == (
        "no verdict: not finite in 2 of 3 seeds of rmsnorm")
    assert shared.pretraining_gain([0.6, nan, 0.7], [0.5, 0.5, 0.4], higher_is_better=True).startswith("no verdict")
    lr = lambda v: ("train.lr", v)  # noqa: E731
    cells = [("m", "rmsnorm", (lr("1"),)), ("m", "rmsnorm", (lr("2"),)), ("m", "dyt", ())]
    for first, second in ((cells[0], cells[1]), (cells[1], cells[0])):  # in either order
        losses = {first: [nan, 4.0, 4.0], second: [5.0, 5.1, 5.2], cells[2]: [4.5, 4.5, 4.5]}
        # judged against the finite baseline point (the NaN one would give "no verdict")
        assert shared.judge(cells[2], losses, "rmsnorm", higher_is_better=False) == (
            "better than rmsnorm's mean ± 2σ [4.900, 5.300]")
    model = TOY.models[0]
    values = {(model.name, "dyt", (lr("1"),)): {"loss": [nan, 1.0, 1.0]}, (model.name, "dyt", (lr("2"),)): {"loss": [2.0, 2.0, 2.0]}}
    lines = sweep_section(tmp_path, model, values, [Metric("loss", "validation loss", higher_is_better=False)],
                          [shared.parse_sweep("dyt:train.lr=1,2")])
    best = [line for line in lines if line.startswith("Best")]
    assert best == ["Best validation loss for dyt: train.lr=2 (2.000 ± 0.000, 3 seed(s))."], lines
    values[model.name, "dyt", (lr("2"),)]["loss"][0] = inf
    lines = sweep_section(tmp_path, model, values, [Metric("loss", "validation loss", higher_is_better=False)],
                          [shared.parse_sweep("dyt:train.lr=1,2")])
    assert [line for line in lines if line.startswith("Best")] == [
        "Best validation loss for dyt: none, every point has seeds that are not finite."]


def test_report_verdicts_with_three_seeds(tmp_path, monkeypatch):
    """The LLaMA table's verdict column over 3 seeds, from hand-made runs (test_reports' helpers)."""
    from test_reports import LLAMA_TINY, _llama_run, table

    from dyt_llama import compare

    monkeypatch.setattr(compare, "plot_s_curves", lambda run, path: path.write_bytes(b"\x89PNG"))
    out = tmp_path / "cmp"
    out.mkdir()
    args = argparse.Namespace(out=out, config=LLAMA_TINY, overrides=[], nproc=2, launcher="deepspeed",
                              norms=["rmsnorm", "dyt"], seeds=[0, 1, 2], sweeps=[])
    made = [_llama_run(out, norm, seed, 2) for seed in args.seeds for norm in args.norms]
    rows = table(compare.write_report(args, [run for run, _ in made], ["x"], "the built-in corpus").read_text(), "norm")
    losses = {norm: [e["eval"] for run, e in made if run.norm == norm] for norm in args.norms}
    expected = verdict(losses["dyt"], losses["rmsnorm"], higher_is_better=False, baseline_name="rmsnorm")
    assert expected != NO_VERDICT
    assert [r["verdict (validation loss, vs rmsnorm)"] for r in rows] == ["baseline", expected]
    centre, spread = statistics.mean(losses["rmsnorm"]), 2 * statistics.stdev(losses["rmsnorm"])
    inside = abs(statistics.mean(losses["dyt"]) - centre) <= spread
    assert expected.startswith("within" if inside else ("better", "worse"))



def _hand_made_w2v(root, seeds, plan):
    """wav2vec 2.0 runs made by hand, one per ``(point, last validation, earlier validations)`` of
    ``plan``, with contrastive and probe evals over ``seeds`` (pretrained and random init):
    (runs, evals) as the compare passes them to ``write_report``."""
    from test_reports import _w2v_evals, _w2v_run

    from dyt_wav2vec2 import compare

    runs, evals = [], {}
    for point, last, earlier in plan:
        made, _ = _w2v_run(root / f"r{len(runs)}", point.norm, last, earlier)
        run = shared.Run(point, made.dir, made.wall_s)
        runs.append(run)
        for pretrained, init in compare.INITS.items():
            evals[run.point, pretrained] = _w2v_evals(random.Random(f"{len(runs)}-{init}"), seeds)
            evals[run.point, pretrained].pop("finetune"), evals[run.point, pretrained].pop("ctc")
    return runs, evals

LEARNING_W2V = {"eval/contrastive_kept": 2.3, "eval/contrastive_accuracy": 0.3, "eval/codebook_perplexity": 50.0,
                "eval/distractors_equal_target": 0.01}
"""The last validation of a wav2vec 2.0 run that learned."""


def _w2v_three_seed_args(tmp_path: Path) -> argparse.Namespace:
    """A wav2vec 2.0 comparison's arguments: 3 pretraining seeds, 3 downstream seeds, contrastive and probe."""
    args = argparse.Namespace(out=tmp_path / "cmp", config=ROOT / "recipes" / "wav2vec2" / "tiny.yaml", overrides=[],
                              nproc=1, launcher="python", pretrain_seeds=[0, 1, 2], seeds=[0, 1, 2], steps=4,
                              evals=["contrastive", "probe"], norms=None, sweeps=[])
    args.out.mkdir()
    return args


@pytest.mark.parametrize("collapsed_norm", ["layernorm", "dyt"])
def test_wav2vec2_verdicts_leave_out_pretrained_rows_beside_a_collapsed_run(tmp_path, collapsed_norm):
    """3 pretraining seeds per norm, the baseline's seed 1 collapsed (as LayerNorm's did on the v4
    speech): its chance-level numbers stretched LayerNorm's mean ± 2σ until DyT was "within" on every
    pretrained row. Those rows get no verdict naming the collapsed run; random-init rows keep theirs.
    DyT's own collapsed seed only moves DyT's mean (the band is the baseline's): the verdict stands,
    the collapse named beside it."""
    from test_reports import table

    from dyt_wav2vec2 import compare

    args, learning = _w2v_three_seed_args(tmp_path), LEARNING_W2V
    collapsed = {"eval/contrastive_kept": 3.045, "eval/contrastive_accuracy": 0.048, "eval/codebook_perplexity": 2.0,
                 "eval/distractors_equal_target": 1.0}
    runs, evals = _hand_made_w2v(tmp_path, args.seeds, [
        (Point(norm, seed, "wav2vec2"), collapsed if (norm, seed) == (collapsed_norm, 1) else learning, learning)
        for seed in args.pretrain_seeds for norm in ("layernorm", "dyt")])
    text = compare.write_report(args, runs, evals).read_text()
    rows = table(text, "norm")
    assert [r["status"].startswith("**collapsed**") for r in rows] == [
        False, False, collapsed_norm == "layernorm", collapsed_norm == "dyt", False, False]
    downstream = table(text, "norm | init")
    dyt = [r for r in downstream if r["norm"] == "dyt"]
    assert {r["init"] for r in dyt} == {"pretrained", "random init"}
    pretrained = [r["verdict (validation contrastive loss)"] for r in rows if r["norm"] == "dyt"]
    pretrained += [r[f"verdict ({t})"] for r in dyt if r["init"] == "pretrained" for t in ("unseen voices", "real recordings")]
    if collapsed_norm == "layernorm":
        assert set(pretrained) == {"no verdict: collapsed pretraining (layernorm seed 1)"}
    else:
        assert all(v.startswith(("within", "better", "worse")) and v.endswith(" (dyt seed 1 collapsed)")
                   for v in pretrained), pretrained
    for row in dyt:
        if row["init"] == "random init":
            verdicts = [row["verdict (unseen voices)"], row["verdict (real recordings)"]]
            assert not any(v.startswith("no verdict") or "collapsed" in v for v in verdicts), row


def test_wav2vec2_report_names_a_diverged_pretraining_and_judges_no_cell_with_it(tmp_path):
    """DyT's pretraining seed 1 diverged: no final validation (no collapse to judge either) and no
    model to evaluate downstream. Its row says diverged, and every pretrained DyT cell counts it as
    not finite and gets no verdict; the random-init rows need no pretraining and keep theirs."""
    from test_reports import DIVERGED_AT_7, table

    from dyt_wav2vec2 import compare

    args, learning = _w2v_three_seed_args(tmp_path), LEARNING_W2V
    runs, evals = _hand_made_w2v(tmp_path, args.seeds, [
        (Point(norm, seed, "wav2vec2"), learning, learning) for seed in args.pretrain_seeds for norm in ("layernorm", "dyt")])
    runs[3] = dataclasses.replace(runs[3], diverged=DIVERGED_AT_7)  # dyt, seed 1
    asked = []  # as the compare makes them: every run but the diverged one from its checkpoint, random init per cell
    made = shared.downstream_evals(runs, lambda run, pretrained: asked.append((run.point, pretrained))
                                   or evals[run.point, pretrained])
    assert asked == [(r.point, True) for r in runs if r is not runs[3]] + [(runs[0].point, False), (runs[1].point, False)]
    assert made[runs[3].point, True] is None and len(made) == 6 + 2
    text = compare.write_report(args, runs, made).read_text()
    rows = table(text, "norm")
    assert [r["status"] for r in rows] == ["learning"] * 3 + ["**diverged** at step 7"] + ["learning"] * 2
    assert [r["verdict (validation contrastive loss)"] for r in rows if r["norm"] == "dyt"] == [
        "no verdict: not finite in 1 of 3 seeds of this row"] * 3
    downstream = table(text, "norm | init")
    order = [(r["norm"], r["init"]) for r in downstream]  # as the evals came: the pretrained rows, then random init
    assert order == [(norm, init) for init in ("pretrained", "random init") for norm in ("layernorm", "dyt") for _ in range(3)]
    for row in (r for r in downstream if r["norm"] == "dyt"):
        verdicts = [row["verdict (unseen voices)"], row["verdict (real recordings)"]]
        if row["init"] == "pretrained":
            assert all(row[t].endswith("(1 of 3 seeds not finite)") for t in compare.TESTS), row
            assert verdicts == ["no verdict: not finite in 1 of 3 seeds of this row"] * 2, row
        else:
            assert not any(v.startswith("no verdict") for v in verdicts), row
    assert "- dyt, seed 1: training loss nan at step 7 (last complete checkpoint: none)" in text.splitlines()


def test_wav2vec2_report_with_a_sweep(tmp_path):
    """wav2vec 2.0's report with a per-norm sweep, from hand-made runs: a sweep-point column, the
    sweep tables of pretraining and downstream metrics, and each DyT point judged against the
    (unswept) baseline with 3 downstream seeds where they are the spread that counts (random init;
    one pretraining run per norm gives its pretrained rows no verdict)."""
    from test_reports import table

    from dyt_wav2vec2 import compare

    sweep = shared.parse_sweep("dyt:model.norm.alpha_init.input=1,2")
    args = argparse.Namespace(out=tmp_path / "cmp", config=ROOT / "recipes" / "wav2vec2" / "tiny.yaml", overrides=[],
                              nproc=1, launcher="python", pretrain_seeds=[0], seeds=[0, 1, 2], steps=4,
                              evals=["contrastive", "probe"], norms=None, sweeps=[sweep])
    args.out.mkdir()
    learning = {"eval/contrastive_kept": 2.3, "eval/contrastive_accuracy": 0.3, "eval/codebook_perplexity": 50.0,
                "eval/distractors_equal_target": 0.01}
    runs, evals = _hand_made_w2v(tmp_path, args.seeds, [
        (Point(norm, 0, "wav2vec2", point), learning, learning)
        for norm, point in (("layernorm", ()), ("dyt", (("model.norm.alpha_init.input", "1"),)),
                            ("dyt", (("model.norm.alpha_init.input", "2"),)))])
    text = compare.write_report(args, runs, evals).read_text()
    rows = table(text, "norm")
    assert [(r["norm"], r["sweep point"]) for r in rows] == [
        ("layernorm", "-"), ("dyt", "model.norm.alpha_init.input=1"), ("dyt", "model.norm.alpha_init.input=2")]
    downstream = table(text, "norm | sweep point | init")
    probe = [r for r in downstream if r["eval"] == compare.EVAL_NAMES["probe"] and r["init"] == "pretrained"]
    assert len(probe) == len(runs) == 3
    untrained_probe = [r for r in downstream if r["eval"] == compare.EVAL_NAMES["probe"] and r["init"] == "random init"]
    untrained_baseline = [r["test"]["real recordings"]["accuracy"] for r in evals[runs[0].point, False]["probe"]]
    for row, untrained_row, run in zip(probe, untrained_probe, runs):
        mine = [r["test"]["real recordings"]["accuracy"] for r in evals[run.point, True]["probe"]]
        # one pretraining run per norm: its fine-tuning seeds judge no norm
        assert row["verdict (real recordings)"] == ("baseline" if run.norm == "layernorm" else shared.ONE_PRETRAINING)
        untrained = [r["test"]["real recordings"]["accuracy"] for r in evals[run.point, False]["probe"]]
        assert untrained_row["verdict (real recordings)"] == ("baseline" if run.norm == "layernorm" else verdict(
            untrained, untrained_baseline, higher_is_better=True, baseline_name="layernorm"))
        assert row["pretrained − random init (real recordings)"] == shared.pretraining_gain(
            mine, untrained, higher_is_better=True)  # each row against its own model untrained
    untrained_rows = [r for r in downstream if r["init"] == "random init"]
    assert untrained_rows and all(r["pretrained − random init (unseen voices)"] == "-" for r in untrained_rows)
    assert "| model.norm.alpha_init.input | validation contrastive loss |" in text
    assert "#### wav2vec 2.0, dyt: keywords, linear probe, accuracy (36 classes), real recordings over the sweep" in text
    assert (args.out / "sweep_wav2vec2_dyt_probe_accuracy_real_recordings.png").read_bytes()[:4] == b"\x89PNG"
    assert "Best contrastive accuracy for dyt: model.norm.alpha_init.input=" in text



def test_w2v_report_without_downstream_evals_compares_pretraining_alone(tmp_path):
    """``--evals none`` (pretraining on your own audio where the built-in speech the evals need
    cannot be built): the runs' table and verdicts, a sweep table of pretraining metrics, and no
    downstream table or sweep of downstream metrics."""
    from test_reports import table

    from dyt_wav2vec2 import compare

    args = _w2v_three_seed_args(tmp_path)
    args.evals, args.sweeps = [], [shared.parse_sweep("dyt:model.norm.alpha_init.input=1,2")]
    runs, _ = _hand_made_w2v(tmp_path, args.seeds, [
        (Point(norm, seed, "wav2vec2", point), LEARNING_W2V, LEARNING_W2V)
        for seed in args.pretrain_seeds
        for norm, point in (("layernorm", ()), ("dyt", (("model.norm.alpha_init.input", "1"),)),
                            ("dyt", (("model.norm.alpha_init.input", "2"),)))])
    text = compare.write_report(args, runs, {}).read_text()
    rows = table(text, "norm")
    assert len(rows) == 9 and {r["verdict (validation contrastive loss)"] for r in rows if r["norm"] == "dyt"} == {
        verdict([2.3] * 3, [2.3] * 3, higher_is_better=False, baseline_name="layernorm")}
    assert "No downstream evals (`--evals none`)." in text and "Downstream, seeds" not in text
    assert "| model.norm.alpha_init.input | validation contrastive loss |" in text
    assert "linear probe" not in text


# ---------------------------------------------------------------- the recipe descriptions


def _specs():
    import dyt_dna
    import dyt_llama
    import dyt_wav2vec2

    return [dyt_llama.SPEC, dyt_wav2vec2.SPEC, dyt_dna.SPEC]


def test_each_recipe_spec_names_what_its_package_holds():
    for spec in _specs():
        package_dir = Path(importlib.import_module(spec.package).__file__).parent
        assert callable(importlib.import_module(spec.train_module).main)
        assert spec.compare_main() is importlib.import_module(spec.compare_module).main
        for model in spec.models:
            path = spec.config_path(model)
            assert path.is_file() and path.resolve().is_relative_to(package_dir)  # shipped inside the package
            config = load_config(spec.config_class, path)
            assert config.model.norm.kind == model.baseline and model.norms[-1] == "dyt"
            # the repository's recipes/ path is the same file, not a copy
            twin = ROOT / "recipes" / spec.name / Path(model.config).name
            assert twin.is_symlink() and twin.resolve() == path.resolve()
        assert spec.metrics and all(isinstance(m, Metric) for m in spec.metrics)
        pyproject = tomllib.loads((ROOT / "packages" / f"dyt-{spec.name}" / "pyproject.toml").read_text())
        assert "configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"][spec.package]
    import dyt_dna

    assert [m.name for m in dyt_dna.SPEC.models] == [
        load_config(dyt_dna.SPEC.config_class, dyt_dna.SPEC.config_path(m)).model.arch for m in dyt_dna.SPEC.models]


def test_llama_role_mapping_covers_this_recipe_and_fairseq2():
    import dyt_llama
    from dyt_llama.model import Llama, ModelConfig

    role_of = dyt_llama.SPEC.role_of
    ours = [name for name, module in Llama(ModelConfig(dim=32, layers=1, heads=4, kv_heads=2, ffn_dim=64,
                                                       vocab_size=50, max_seq_len=16)).named_modules()
            if type(module).__name__ == "RMSNorm"]
    assert sorted(role_of(n) for n in ours) == ["attention", "ffn", "final"]
    assert [role_of(p) for p in ("decoder.layers.3.self_attn_layer_norm", "decoder.layers.3.ffn_layer_norm",
                                 "decoder.layer_norm")] == ["attention", "ffn", "final"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_compare_commands_take_their_facts_from_the_spec(index, tmp_path, monkeypatch):
    """Each dyt-*-compare plans its runs through the shared plan_runs with its own SPEC: the module
    to launch, the packaged default config(s), the default norms per model, ``--out``'s default."""
    import importlib

    spec = _specs()[index]
    module = importlib.import_module(spec.compare_module)
    seen = {}

    class Planned(Exception):
        pass

    def capture(spec_given, args, models, seeds):
        seen.update(spec=spec_given, args=args, models=models, seeds=seeds,
                    plan=plan_runs(spec_given, args, models, seeds))  # the real plan, nothing launched
        raise Planned

    monkeypatch.setattr(module, "plan_runs", capture)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Planned):
        module.main(["--launcher", "python", "--nproc", "1"])
    assert seen["spec"] is spec
    assert seen["args"].out == Path(f"runs/{spec.name}-compare")
    assert [(m, Path(p).resolve()) for m, p in seen["models"]] == [(m, spec.config_path(m).resolve()) for m in spec.models]
    planned = seen["plan"]
    assert [(p.point.model, p.point.norm) for p in planned] == [(m.name, n) for m in spec.models for n in m.norms]
    for p in planned:
        assert p.config.model.norm.kind == p.point.norm and p.dir == seen["args"].out / p.point.dir_name()
    assert not (tmp_path / "runs").exists()  # planning creates nothing


def test_demo_runs_every_recipe_compare_through_its_spec(tmp_path, monkeypatch):
    specs = _specs()
    demo_spec = importlib.util.spec_from_file_location("demo_under_test", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(demo_spec)
    demo_spec.loader.exec_module(demo)
    assert [spec for spec, _, _ in demo.PARTS] == specs
    assert [spec for spec, _ in demo.CONVERSIONS] == [specs[1], specs[0]]
    called = []

    def fake_compare(spec):
        def main(argv):
            called.append((spec.name, argv))
            report = Path(argv[argv.index("--out") + 1]) / "report.md"
            report.parent.mkdir(parents=True, exist_ok=True)
            (report.parent / ".in_use").touch()  # as a comparison's prepare_out leaves it
            report.write_text(f"# {spec.title} report\n\n![x](x.png)\n")
            return report
        return main

    for spec in specs:
        monkeypatch.setattr(importlib.import_module(spec.compare_module), "main", fake_compare(spec))

    row = {"forward_ms": 1.0, "forward_GBps": 1.0, "forward_peak_bytes": 1, "forward_backward_ms": 2.0,
           "forward_backward_GBps": 1.0, "forward_backward_peak_bytes": 2}
    kernels = {"8x8": {name: row for name in ("copy", "F.layer_norm", "F.rms_norm")}}

    def fake_bench(argv):
        called.append(("bench", argv))
        payload = {"machine": {"device": "cpu", "threads": 2, "torch": "x"}, "kernels": kernels, "dtype": "float32"}
        if "--training-allocator" in argv:
            payload["training_allocator"] = {"allocator_env": {}, "kernels": kernels}
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps(payload))

    monkeypatch.setattr(demo, "run_bench", fake_bench)
    monkeypatch.setattr(demo, "CONVERSIONS", [])
    # a CPU whose malloc the bench may set as training ranks do: the second pass is asked for
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo, "cannot_keep_freed_blocks", lambda: None)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--out", str(tmp_path / "demo"), "--nproc", "1"])
    demo.main()
    assert [name for name, _ in called] == ["llama", "wav2vec2", "dna", "bench"]
    for (_, argv), spec in zip(called, specs):
        assert argv[:4] == ["--out", str(tmp_path / "demo" / spec.name), "--nproc", "1"]
    assert "--training-allocator" in called[-1][1]
    text = (tmp_path / "demo" / "report.md").read_text()
    assert all(f"## {spec.title} report" in text for spec in specs) and "](llama/x.png)" in text
    assert "## DyT vs LayerNorm / RMSNorm, 8x8 float32 (median" in text
    # which rows are in-sample: the shipped LLaMA config's provenance, not claimed for a config of the user's
    assert demo.LLAMA_IN_SAMPLE in text and demo.OTHERS_IN_SAMPLE in text
    assert demo.LLAMA_IN_SAMPLE not in demo.in_sample_note(Path("mine.yaml"))
    assert "## DyT vs LayerNorm / RMSNorm, 8x8 float32, as CPU training ranks allocate" in text
    assert not any("--fresh" in argv for _, argv in called)

    called.clear()  # --fresh: every part trains anew
    monkeypatch.setattr(sys, "argv", ["demo.py", "--out", str(tmp_path / "demo"), "--nproc", "1", "--fresh"])
    demo.main()
    assert [argv[-1] for _, argv in called[:3]] == ["--fresh"] * 3


def test_demo_converts_fairseq2_llama_with_the_recipe_roles():
    """The demo converts other libraries' LLaMA with dyt_llama's own norm settings and roles: at width
    2048 the paper's table gives attention norms alpha0 1.0, the others 0.5."""
    from fairseq2.models.llama import LLaMAConfig, create_llama_model

    import dyt_llama
    from dyt import DyT

    demo_spec = importlib.util.spec_from_file_location("demo_convert", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(demo_spec)
    demo_spec.loader.exec_module(demo)
    model = create_llama_model(LLaMAConfig(model_dim=2048, max_seq_len=16, vocab_size=16, num_layers=1,
                                           num_attn_heads=16, num_key_value_heads=16, ffn_inner_dim=64))
    alphas = {}
    original = demo.convert_norms

    def spy(target, norm, role_of=None):
        report = original(target, norm, role_of=role_of)
        if norm != "rmsnorm":
            alphas.update({n: m.alpha.item() for n, m in target.named_modules() if isinstance(m, DyT)})
            assert not any(isinstance(m, DyT) and m.bias is not None for m in target.modules())  # LLaMA: no bias
        return report

    demo.convert_norms = spy
    to_dyt, back = demo.convert_and_back(dyt_llama.SPEC, model)
    assert alphas == {"decoder.layers.0.self_attn_layer_norm": 1.0, "decoder.layers.0.ffn_layer_norm": 0.5,
                      "decoder.layer_norm": 0.5}
    assert len(to_dyt.replaced) == 3 and len(back.replaced) == 3 and back.target == "rmsnorm"


def test_random_init_is_fine_tuned_once_per_cell():
    """An untrained model does not depend on the pretraining seed: its downstream evals are made for the
    first run of each cell only (three copies averaged would report a spread of 0)."""
    runs = [shared.Run(Point(norm, seed, "m", sweep), Path(f"{norm}{seed}{len(sweep)}"), 1.0)
            for seed in (0, 1, 2) for norm in ("layernorm", "dyt") for sweep in ((), (("train.lr", "1"),))]
    assert shared.fine_tuned_runs(runs, pretrained=True) == runs
    untrained = shared.fine_tuned_runs(runs, pretrained=False)
    assert [(r.point.norm, r.point.seed, r.point.sweep) for r in untrained] == [
        ("layernorm", 0, ()), ("layernorm", 0, (("train.lr", "1"),)), ("dyt", 0, ()), ("dyt", 0, (("train.lr", "1"),))]


def test_downstream_values_are_pretraining_means_whenever_there_are_several():
    """One pretraining run: its fine-tuning values; several: each run's mean, so two pretraining seeds
    give two values (no verdict) rather than pooling both runs' fine-tunings into a spread of neither."""
    assert shared.over_pretrainings([[0.1, 0.2, 0.3]]) == [0.1, 0.2, 0.3]
    assert shared.over_pretrainings([[0.1, 0.3], [0.5, 0.7]]) == pytest.approx([0.2, 0.6])
    assert verdict(shared.over_pretrainings([[0.1, 0.3], [0.5, 0.7]]), [0.4, 0.5, 0.6],
                   higher_is_better=True) == NO_VERDICT


def test_a_report_says_when_a_verdict_reads_the_numbers_its_baseline_point_was_chosen_on():
    from dyt.train.compare import CHOSEN_IN_SAMPLE, parse_sweep, settings_notes

    def notes(*sweeps):
        return settings_notes(argparse.Namespace(overrides=[], sweeps=[parse_sweep(s) for s in sweeps]))

    assert CHOSEN_IN_SAMPLE in notes("rmsnorm:train.lr=1e-3,2e-3", "dyt:train.lr=1e-2,2e-2")
    assert CHOSEN_IN_SAMPLE not in notes("train.lr=1e-3,2e-3")  # every point paired with the baseline's same one


def test_stored_evals_are_asked_for_in_one_order_whatever_the_command_lines(monkeypatch, tmp_path):
    """Stored evals are reused by their settings: ``--seeds 2 0 1`` or ``--evals probe contrastive``
    asked for what ``--seeds 0 1 2 --evals contrastive probe`` stored, and ran it all again."""
    from dyt_dna.eval import finetune_seeds
    from dyt_wav2vec2 import compare

    class Planned(Exception):
        pass

    def stop(spec, args, models, seeds):
        raise Planned(args)

    monkeypatch.setattr(compare, "plan_runs", stop)
    with pytest.raises(Planned) as planned:
        compare.main(["--out", str(tmp_path / "cmp"), "--launcher", "python", "--nproc", "1",
                      "--evals", "probe", "contrastive", "--seeds", "2", "0", "1"])
    args = planned.value.args[0]
    assert (args.evals, args.seeds) == (["contrastive", "probe"], [0, 1, 2])
    dna = argparse.Namespace(epochs=1, batch_size=2, lr=1e-3, patience=1, max_steps=1, seeds=[2, 0, 1])
    assert finetune_seeds(dna) == [0, 1, 2]
    # the DNA compare takes that order for what it stores, reports and writes in summary.json
    from dyt_dna import compare as dna_compare

    monkeypatch.setattr(dna_compare, "plan_runs", stop)
    with pytest.raises(Planned) as planned:
        dna_compare.main(["--out", str(tmp_path / "dna"), "--launcher", "python", "--nproc", "1",
                          "--seeds", "2", "0", "1"])
    assert planned.value.args[0].seeds == [0, 1, 2]


def test_a_section_no_training_reads_is_found_along_the_key():
    """A comparison refuses a sweep inside a section marked ``TRAINING_READS_NONE`` (wav2vec 2.0's
    ``eval``: tests/test_wav2vec2.py runs the refusal), the section itself included, at any depth;
    keys elsewhere, and names that are not settings, are not in one."""
    from dyt.train.config import section_training_reads_none

    @dataclasses.dataclass
    class Budget:
        steps: int = 1
        TRAINING_READS_NONE = True

    @dataclasses.dataclass
    class Inner:
        budget: Budget = dataclasses.field(default_factory=Budget)
        lr: float = 1.0

    @dataclasses.dataclass
    class Config:
        train: Inner = dataclasses.field(default_factory=Inner)
        eval: Budget = dataclasses.field(default_factory=Budget)

    config = Config()
    assert section_training_reads_none(config, "eval.steps") == "eval"
    assert section_training_reads_none(config, "eval") == "eval"
    assert section_training_reads_none(config, "train.budget.steps") == "train.budget"
    assert section_training_reads_none(config, "train.lr") is None
    assert section_training_reads_none(config, "train") is None
    assert section_training_reads_none(config, "model.dim") is None
