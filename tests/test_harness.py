"""The shared training harness: resume continuity, non-finite stop, atomic checkpoints, metrics,
and launches with 2 ranks under the deepspeed launcher and torchrun."""

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dyt.errors import UserInputError
from dyt.train import DistInfo, TrainConfig, Trainer, read_metrics, run_recipe, warmup_cosine
from dyt.train.checkpoint import DIVERGED
from dyt.train.compare import _last_step
from dyt.train.distributed import free_port
from dyt.train.trainer import (
    DataPosition,
    idle_validation_warning,
    seed_everything,
    validation_batches,
    validation_positions,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from toy_recipe import ToyConfig, ToyTask  # noqa: E402


def _run(out_dir, *overrides, resume=False, task=ToyTask):
    argv = [
        "--set", f"train.out_dir={out_dir}", "--set", "train.steps=8", "--set", "train.save_every=4",
        "--set", "train.eval_every=4", "--set", "train.grad_accum=2", "--set", "train.warmup_steps=2",
        "--set", "train.micro_batch_size=16", "--set", "train.lr=0.01", "--set", "train.progress=false",
    ]
    for item in overrides:
        argv += ["--set", item]
    return run_recipe(ToyConfig, task, argv + (["--resume"] if resume else []))


def _series(out_dir, key):
    return {row["step"]: row[key] for row in read_metrics(Path(out_dir) / "metrics.jsonl") if key in row}


def _final_weights(out_dir):
    ckpt = sorted((Path(out_dir) / "checkpoints").glob("step_*"))[-1]
    states = torch.load(next(ckpt.glob("*model_states.pt")), weights_only=False)["module"]
    return states


@pytest.mark.parametrize("stage", [0, 2])
def test_a_smaller_lr_on_resume_continues_the_schedule_at_the_new_peak(tmp_path, stage):
    """After a loss spike the usual answer is the last good checkpoint with a smaller peak rate.
    DeepSpeed's load restores the saved base rate with the scheduler, so the harness sets the run's
    own ``train.lr`` again: steps 5-8 follow the schedule of ``lr=0.004`` at those steps."""
    import shutil

    items = [f"train.zero_stage={stage}", "train.log_every=1"]
    _run(tmp_path / "whole", *items)
    shutil.copytree(tmp_path / "whole", tmp_path / "smaller")
    shutil.rmtree(tmp_path / "smaller/checkpoints/step_00000008")
    _run(tmp_path / "smaller", *items, "train.lr=0.004", resume=True)
    whole, smaller = _series(tmp_path / "whole", "lr"), _series(tmp_path / "smaller", "lr")

    def schedule(lr):
        factor = warmup_cosine(TrainConfig(steps=8, warmup_steps=2, lr=lr))
        return [lr * factor(step - 1) for step in range(5, 9)]

    assert [whole[step] for step in range(5, 9)] == pytest.approx(schedule(0.01), rel=1e-12)
    assert [smaller[step] for step in range(5, 9)] == pytest.approx(schedule(0.004), rel=1e-12)
    losses = _series(tmp_path / "whole", "train/loss"), _series(tmp_path / "smaller", "train/loss")
    assert losses[1][5] == pytest.approx(losses[0][5], rel=1e-6) and losses[1][6] != pytest.approx(losses[0][6], rel=1e-6)


@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_the_gradient_norm_is_logged_before_clipping_at_every_zero_stage(tmp_path, precision, rel):
    """ZeRO-1/2/3 keep the gradient norm; at ZeRO-0 DeepSpeed keeps none (torch's AdamW in fp32) or
    keeps it before dividing out fp16's loss scale: the harness takes it there before the update, in
    fp32. Both are the norm before clipping (the clip, 0.05, bites on every step); in bf16 ZeRO-0
    sums the micro-batches' gradients in bf16, ZeRO-2 in fp32."""
    norms = {}
    for stage in (0, 2):
        _run(tmp_path / f"z{stage}", f"train.zero_stage={stage}", "train.log_every=1", "train.grad_clip=0.05",
             f"train.precision={precision}")
        norms[stage] = _series(tmp_path / f"z{stage}", "grad_norm")
    assert sorted(norms[0]) == list(range(1, 9))
    assert all(norm > 0.05 for norm in norms[0].values())
    assert [norms[2][k] for k in sorted(norms[2])] == pytest.approx([norms[0][k] for k in sorted(norms[0])], rel=rel)


def _diverged(capsys, out_dir, *overrides) -> str:
    with pytest.raises(SystemExit) as stopped:
        _run(out_dir, *overrides)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip()


def test_a_metrics_writer_failing_at_close_does_not_hide_the_error_that_stops_the_run(tmp_path, capsys, monkeypatch):
    """TensorBoard's writer re-raises at close what its thread met (a full disk): closed while a
    divergence stops the run, that replaced the divergence's one line with a traceback."""
    from dyt.train.metrics import MetricsLogger

    closed = MetricsLogger.close

    def close(self):
        closed(self)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MetricsLogger, "close", close)
    said = _diverged(capsys, tmp_path / "run", "data.nan_at_step=3")
    assert said.splitlines()[-1].split(": ", 1)[1].startswith("diverged: loss became nan at step 3;"), said[-2000:]
    with pytest.raises(OSError, match="No space left"):  # a run that finishes still says so
        _run(tmp_path / "finished", "train.steps=2")


def test_a_divergence_that_cannot_be_recorded_is_still_the_one_line_that_stops_the_run(tmp_path, capsys, monkeypatch):
    """Rank 0 records a divergence in diverged.json; on a full disk that write raised on rank 0 alone,
    a traceback in place of the divergence's line (the other ranks stopped quietly on it)."""
    def record_divergence(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dyt.train.checkpoint.record_divergence", record_divergence)
    said = _diverged(capsys, tmp_path / "run", "data.nan_at_step=3").splitlines()[-1]
    assert said.split(": ", 1)[1].startswith("diverged: loss became nan at step 3; last good checkpoint: none yet (not "
                                             f"recorded in {tmp_path / 'run' / DIVERGED}: No space left on device); "), said


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_batch_that_cannot_be_read_is_one_line_and_a_bug_in_a_collate_keeps_its_traceback(tmp_path, capsys,
                                                                                             num_workers):
    """Every batch read is agreed by the ranks (tests/test_bad_input.py stops two): a data error is
    one line naming the micro-batch, the error's own words (a DataLoader worker's error arrives with
    the worker's traceback as its message) and what --resume takes; any other error a read raised (a
    bug in the task's collate) is raised as it was. Micro-batches of 16, 2 a step: read 40 is in step
    2's first."""
    said = _diverged(capsys, tmp_path / "run", "data.unreadable_from_read=40", "data.fault_rank=0",
                     f"train.num_workers={num_workers}")
    assert said.splitlines()[-1].split(": ", 1)[1] == (
        "read error: could not read training micro-batch 1 of 2 of step 2 (_ToyDataError: example "
        f"{said.split('(_ToyDataError: example ')[1].split()[0]} of the toy data is unreadable "
        "(data.unreadable_from_read)); there is no complete checkpoint yet: --resume starts from step 0. Mend what "
        "the error names and run again with --resume"), said

    class BuggyCollate(ToyTask):
        collated = 0  # in the process that collates: with num_workers=1 the worker's copy of the task

        def collate(self, items):
            self.collated += 1
            if self.collated == 3:
                raise KeyError("a bug")
            return super().collate(items)

    with pytest.raises(KeyError, match="a bug"):
        _run(tmp_path / "bug", f"train.num_workers={num_workers}", task=BuggyCollate)


def test_a_validation_batch_is_agreed_on_once_it_is_on_its_device(tmp_path, monkeypatch):
    """Moving a batch to its device is part of the read the ranks agree on, in validation as in
    training: a rank failing there (a GPU's memory) would otherwise leave the others in ZeRO-3's
    collective forward."""
    from dyt.train import BatchReadError

    task = ToyTask(ToyConfig())
    engine = _engine_of(task)
    _reads_agreed_alone(monkeypatch)

    def to_device(batch, device, float_dtype=None):
        raise OSError("the device is gone")

    monkeypatch.setattr("dyt.train.trainer.to_device", to_device)
    trainer = _validating_rank(task, TrainConfig(micro_batch_size=4, eval_batches=2), 0, 1)
    trainer.ckpt_root = tmp_path  # no checkpoint yet
    with pytest.raises(BatchReadError, match=r"could not read a validation batch \(turn 1 of 2 on each rank\) "
                                             r"\(OSError: the device is gone\); there is no complete checkpoint yet"):
        trainer._evaluate(engine, task.eval_dataset())


@pytest.mark.parametrize("make_error", [lambda: UserInputError("example 5 holds no target"),
                                        lambda: RuntimeError("out of memory")], ids=["data", "runtime"])
def test_a_validation_forward_failing_on_one_rank_is_agreed_on_after_every_read(tmp_path, monkeypatch, make_error):
    """Below ZeRO-3 a validation forward is not collective, but every batch read is agreed on: a rank
    whose forward raised (a GPU out of memory, a bad example) reads on with the others, runs no more
    forwards, and the ranks agree on the failure after the loop (one all-reduce), as after a training
    forward: a failure said in one line stops every rank with rank 0's line, any other is raised as
    it was on its rank (the others stop with the line)."""
    from dyt.train import ForwardFailedError

    task = ToyTask(ToyConfig())
    engine = _engine_of(task)
    _reads_agreed_alone(monkeypatch)
    raised = make_error()
    forwards, reads = [], []
    real_loss, real_read = task.loss, Trainer._read_together

    def loss(model, batch):
        forwards.append(1)
        if len(forwards) == 2:
            raise raised
        return real_loss(model, batch)

    monkeypatch.setattr(task, "loss", loss)
    monkeypatch.setattr(Trainer, "_read_together",
                        lambda self, *args, **kwargs: reads.append(1) or real_read(self, *args, **kwargs))
    trainer = _validating_rank(task, TrainConfig(micro_batch_size=4, eval_batches=4), 0, 1)
    trainer.ckpt_root = tmp_path
    with pytest.raises(ForwardFailedError if isinstance(raised, UserInputError) else RuntimeError) as stopped:
        trainer._evaluate(engine, task.eval_dataset())
    assert (len(reads), len(forwards)) == (4, 2)
    if isinstance(raised, UserInputError):
        assert str(stopped.value).startswith("the forward of a validation batch failed (UserInputError: example 5 "
                                             "holds no target); there is no complete checkpoint yet")


def test_the_other_ranks_learn_a_failures_own_words_and_whether_it_is_a_data_error():
    """What rank 0 prints of another rank's failed read or forward: a DataLoader worker's error as its
    own words (torch wraps it in the worker's traceback), an error that is not a data error said to be
    one, and words even where the unwrapping fails (every other rank waits for them)."""
    from dyt.train.trainer import _failure_words

    class DataError(UserInputError):
        pass

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\n    g()\nmod.DataError: file a.wav is cut short\n")
    assert _failure_words(wrapped) == "DataError: file a.wav is cut short"
    assert _failure_words(KeyError("k")) == "KeyError: 'k' (not a data error: that rank prints its traceback)"
    assert _failure_words(OSError(5, "Input/output error")) == "OSError: [Errno 5] Input/output error"

    class Unprintable(ValueError):
        def __str__(self):
            raise RuntimeError("no words")

    assert _failure_words(Unprintable()) == "Unprintable (not a data error: that rank prints its traceback)"


def test_the_missing_file_check_counts_data_parallel_ranks_under_model_parallelism(tmp_path):
    """DeepSpeed names a rank's ZeRO files by its data-parallel rank and its model-parallel rank
    (AutoTP): 4 ranks as 2 x 2 write zero_pp_rank_{0,1}_mp_rank_{00,01}; none is missing there, and
    one taken away is named."""
    from dyt.train.checkpoint import _damaged_file

    (tmp_path / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 4}))
    for data_rank in (0, 1):
        for model_rank in ("00", "01"):
            for kind in ("model", "optim"):
                torch.save({}, tmp_path / f"zero_pp_rank_{data_rank}_mp_rank_{model_rank}_{kind}_states.pt")
    alone = DistInfo(0, 1, 0, torch.device("cpu"))
    assert _damaged_file(tmp_path, sorted(tmp_path.glob("*.pt")), alone) is None
    (tmp_path / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    assert _damaged_file(tmp_path, sorted(tmp_path.glob("*.pt")), alone)[1] == \
        "zero_pp_rank_1_mp_rank_01_optim_states.pt is missing"


def test_a_damaged_universal_copy_names_the_copy_to_delete_not_the_checkpoint(tmp_path, monkeypatch):
    """The universal form of a checkpoint for another world size is made again from the checkpoint
    when deleted: a damaged file in it must not send the user to delete the sound checkpoint."""
    from dyt.train import checkpoint

    directory = tmp_path / "step_00000004"
    (directory / "universal/zero/weight").mkdir(parents=True)
    torch.save({}, directory / "mp_rank_00_model_states.pt")
    (directory / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 2}))
    torch.save({}, directory / "universal/zero/weight/fp32.pt")
    (directory / "universal/zero/weight/exp_avg.pt").write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setattr(checkpoint, "failures_agreed", lambda error, words=None: [(0, words)] if error else [])
    with pytest.raises(checkpoint.CheckpointLoadError) as stopped:
        checkpoint.load(None, directory, DistInfo(0, 1, 0, torch.device("cpu")), universal=True)
    assert str(stopped.value) == (
        f"{directory / 'universal'}, the universal form of {directory} for this world size, holds a damaged or missing "
        "file (universal/zero/weight/exp_avg.pt: File is not a zip file): delete that folder (not the checkpoint) for "
        "the next resume to convert it again")


def test_updates_skipped_in_a_row_stop_the_run_as_diverged(tmp_path, capsys):
    """With gradients NaN and the loss finite, ZeRO-2 skips every update (the step counts, the weights
    and schedule stay): a run that only skips would "train" for days. After MAX_SKIPPED_IN_A_ROW it
    stops as diverged, recorded for comparisons like a NaN loss."""
    from dyt.train.trainer import MAX_SKIPPED_IN_A_ROW

    steps = 2 + MAX_SKIPPED_IN_A_ROW + 2
    said = _diverged(capsys, tmp_path / "run", "train.zero_stage=2", f"train.steps={steps}", "train.save_every=2",
                     "data.nan_gradient_from_step=3", "train.log_every=1")
    stop = 2 + MAX_SKIPPED_IN_A_ROW
    assert f"DeepSpeed skipped the last {MAX_SKIPPED_IN_A_ROW} updates" in said and f"at step {stop};" in said, said
    # the newest save: weights as at step 2 (the updates since were skipped), finite
    assert re.search(rf"last good checkpoint: \S*step_{stop - 2:08d} ", said), said
    record = json.loads((tmp_path / "run" / DIVERGED).read_text())
    assert record["step"] == stop and "skipped" in record["loss"]
    skipped = _series(tmp_path / "run", "skipped_steps")
    assert skipped[2] == 0 and skipped[stop - 1] == MAX_SKIPPED_IN_A_ROW - 1


def test_fp16_at_its_smallest_loss_scale_stops_as_diverged(tmp_path, capsys, monkeypatch):
    """DeepSpeed's fp16 scaler raises a bare Exception once gradients overflow at the smallest scale
    (fp16 needs CUDA here, so its raise is stood in for at step 3): a divergence, one line and a
    record, not a traceback on every rank. Any other exception from the step still propagates."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    step = DeepSpeedEngine.step

    def overflowing(engine, *args, **kwargs):
        if engine.global_steps == 2:
            raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")
        return step(engine, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "step", overflowing)
    said = _diverged(capsys, tmp_path / "run", "train.grad_accum=1")
    assert "fp16 gradients overflowed at the smallest loss scale at step 3;" in said, said
    assert json.loads((tmp_path / "run" / DIVERGED).read_text())["step"] == 3

    def broken(engine, *args, **kwargs):
        raise Exception("something else")

    monkeypatch.setattr(DeepSpeedEngine, "step", broken)
    with pytest.raises(Exception, match="something else"):
        _run(tmp_path / "other")


def test_non_finite_weights_are_never_saved_as_a_good_checkpoint(tmp_path, capsys):
    """At ZeRO-0 in fp32 DeepSpeed applies a NaN gradient (torch's AdamW has no overflow check): the
    weights go NaN with the loss of that step finite. A checkpoint of them would be the one --resume
    takes and the one a divergence record called last good; the run stops before saving it."""
    said = _diverged(capsys, tmp_path / "run", "train.zero_stage=0", "data.nan_gradient_from_step=8")
    assert "the weights became NaN or infinite at step 8;" in said, said
    assert "last good checkpoint: " in said and "step_00000004" in said, said
    assert not (tmp_path / "run/checkpoints/step_00000008").exists()
    assert json.loads((tmp_path / "run" / DIVERGED).read_text())["step"] == 8


def test_interrupted_run_resumes_on_the_same_curve(tmp_path, capsys):
    straight = _run(tmp_path / "straight")
    assert straight.step == 8
    with pytest.raises(SystemExit) as stopped:  # one line, not a traceback: a training outcome, not a bug
        _run(tmp_path / "resumed", "data.nan_at_step=6")
    assert stopped.value.code == 2
    said = capsys.readouterr().err.strip()
    assert re.fullmatch(r"\S+: diverged: loss became nan at step 6; last good checkpoint: \S*step_00000004 "
                        r"\(recorded in \S*diverged.json\); the same settings would replay the same steps: a smaller "
                        r"train.lr \(--resume --set train.lr=... continues from that checkpoint\) or DyT alpha0 "
                        r"\(a new run\) may train", said), said
    assert not (tmp_path / "resumed/checkpoints/step_00000008").exists()
    record = json.loads((tmp_path / "resumed" / DIVERGED).read_text())  # what a comparison reports it by
    assert (record["step"], record["loss"], record["world_size"]) == (6, "nan", 1)
    assert record["last_good"].endswith("step_00000004") and record["config"]["data"]["nan_at_step"] == 6
    with open(tmp_path / "resumed/metrics.jsonl", "a") as metrics:  # a kill in the middle of logging a row
        metrics.write('{"step": 7, "train/lo')
    assert _last_step(tmp_path / "resumed") == 5  # what a comparison reads before it relaunches the run (6 went NaN)
    capsys.readouterr()
    # a save of step 8 interrupted once by a larger world: its shards must not end up in the new step 8
    stale = tmp_path / "resumed/checkpoints/step_00000008/zero_pp_rank_5_mp_rank_00_optim_states.pt"
    stale.parent.mkdir()
    stale.write_bytes(b"from 8 ranks")
    resumed = _run(tmp_path / "resumed", resume=True)
    assert resumed.step == 8
    assert not stale.exists() and (stale.parent / "COMPLETE").is_file()
    assert not (tmp_path / "resumed" / DIVERGED).exists()  # every launch removes the record of the last one
    # a run that silently started over would draw the same curve: it must say where it resumed
    assert re.search(r"resumed from \S*step_00000004 \(step 4,", capsys.readouterr().out)

    for key in ("train/loss", "eval/loss", "lr"):
        a, b = _series(tmp_path / "straight", key), _series(tmp_path / "resumed", key)
        assert a.keys() == b.keys() and len(a) >= 2
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (key, step)
    for name, tensor in _final_weights(tmp_path / "straight").items():
        torch.testing.assert_close(_final_weights(tmp_path / "resumed")[name], tensor, rtol=1e-6, atol=1e-6)


def test_a_resume_on_data_made_otherwise_is_refused(tmp_path, capsys):
    """A task's ``data_identity`` (LLaMA: its tokenizer's digest) is recorded at the run's start;
    a ``--resume`` whose data came out otherwise (a BPE trained again in a moved cache) stops before
    training, naming the change; the same identity resumes; a run from before the record resumes
    and records what it has now."""

    class Identified(ToyTask):
        digest = "aaa"

        def data_identity(self) -> dict[str, str]:
            return {"tokenizer sha256": self.digest}

    _run(tmp_path / "run", task=Identified)
    record = tmp_path / "run" / "data_identity.json"
    assert json.loads(record.read_text()) == {"tokenizer sha256": "aaa"}
    Identified.digest = "bbb"
    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path / "run", "train.steps=12", resume=True, task=Identified)
    assert stopped.value.code == 2
    assert re.search(r"config error: --resume: the data is not what \S*run trained on \(tokenizer sha256 aaa -> bbb; "
                     r"recorded in \S*data_identity.json\)", capsys.readouterr().err)
    assert _last_step(tmp_path / "run") == 8
    Identified.digest = "aaa"
    assert _run(tmp_path / "run", "train.steps=12", resume=True, task=Identified).step == 12
    record.unlink()
    Identified.digest = "ccc"
    assert _run(tmp_path / "run", "train.steps=16", resume=True, task=Identified).step == 16
    assert json.loads(record.read_text()) == {"tokenizer sha256": "ccc"}


def test_a_new_run_into_a_folder_holding_checkpoints_is_refused(tmp_path, capsys):
    """Without --resume, a folder with another run's checkpoints is refused before anything is built:
    the new run's own checkpoints would be pruned as older than the old ones, and a later --resume
    would continue the old weights under the new settings. --resume with fewer steps than its newest
    checkpoint would train nothing."""
    _run(tmp_path / "run")
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path / "run", "train.seed=5")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"config error: \S*run holds a run's checkpoints \(newest \S*step_00000008, step 8\): --resume "
                     r"continues that run; a new run needs another train.out_dir", err), err
    with pytest.raises(SystemExit):
        _run(tmp_path / "run", "train.steps=6", resume=True)
    assert "--resume: train.steps 6 is below the step of the run's newest checkpoint" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # untouched
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]


def test_a_damaged_file_in_a_complete_checkpoint_is_one_line(tmp_path, capsys):
    """A file cut short is found before DeepSpeed's load (every rank checks its share of the files:
    tests/test_bad_input.py stops two ranks on one); a sound torch file that does not hold what the
    load expects is DeepSpeed's load error, in one line."""
    _run(tmp_path / "run")
    newest = tmp_path / "run/checkpoints/step_00000008"
    states = next(newest.glob("*model_states.pt"))
    sound = states.read_bytes()
    states.write_bytes(sound[:100])  # cut short after its save completed
    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path / "run", "train.steps=10", resume=True)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].split(": ", 1)[1] == (
        f"checkpoint error: {newest} is marked complete but a file in it is damaged or missing ({states.name}: File is "
        "not a zip file): delete that folder to resume from the one before")
    torch.save({"not": "model states"}, states)
    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path / "run", "train.steps=10", resume=True)
    assert stopped.value.code == 2
    assert re.search(r"checkpoint error: \S*step_00000008 is marked complete but does not load \(.+\): if a file in it "
                     r"was damaged since the save, delete that folder", capsys.readouterr().err)


def test_the_check_before_a_load_passes_whole_torch_files_of_either_format(tmp_path):
    """DeepSpeed writes torch's zip format unless its config says ``checkpoint_serialization: false``
    (the legacy pickle format, which cannot be checked without loading it): both pass, and a zip cut
    short, an empty file or another file do not."""
    from dyt.train.checkpoint import _torch_file_problem

    torch.save({"w": torch.ones(3)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    whole = (tmp_path / "zip.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:-1])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a torch file")
    assert [_torch_file_problem(tmp_path / f"{name}.pt") is None for name in ("zip", "legacy", "cut", "empty", "text")] \
        == [True, True, False, False, False]
    assert _torch_file_problem(tmp_path / "gone.pt") is not None
    extra = tmp_path / "ds.json"  # a whole run saving the legacy format resumes
    extra.write_text(json.dumps({"checkpoint": {"checkpoint_serialization": False}}))
    _run(tmp_path / "run", "train.steps=4", f"train.deepspeed_config={extra}")
    assert (tmp_path / "run/checkpoints/step_00000004/mp_rank_00_model_states.pt").read_bytes()[:1] == b"\x80"
    _run(tmp_path / "run", "train.steps=6", f"train.deepspeed_config={extra}", resume=True)
    assert (tmp_path / "run/checkpoints/step_00000006/COMPLETE").is_file()


def test_incomplete_checkpoint_is_ignored(tmp_path, capsys):
    _run(tmp_path, "train.steps=4", "train.save_every=2")
    partial = tmp_path / "checkpoints" / "step_00000009"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    _run(tmp_path, "train.steps=6", "train.save_every=2", resume=True)
    assert re.search(r"resumed from \S*step_00000004 \(step 4,", capsys.readouterr().out)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]  # keep_checkpoints=2; the partial one removed
    assert _series(tmp_path, "train/loss").keys() == set(range(1, 7))


def test_metrics_logs_alpha_lr_throughput_and_tensorboard(tmp_path):
    _run(tmp_path, "train.steps=3", "train.eval_every=0")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"train/loss", "lr", "throughput", "alpha/1"} <= rows[-1].keys()
    assert rows[0]["alpha/1"] != rows[-1]["alpha/1"]  # alpha is learned
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "norm:\n    kind: dyt" in (tmp_path / "config.yaml").read_text()


def test_updates_deepspeed_skipped_are_logged(tmp_path, monkeypatch):
    """fp16's loss scaler skips the update of a step whose gradients overflow (and the schedule with
    it), yet the step counts: each logged row says how many updates were skipped so far."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    step = DeepSpeedEngine.step
    calls = []

    def overflowing_second_step(engine, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # as DeepSpeed counts an overflow: the update is not taken
            engine.skipped_steps += 1
            return None
        return step(engine, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "step", overflowing_second_step)
    _run(tmp_path, "train.steps=3", "train.eval_every=0", "train.grad_accum=1")
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 1]


def test_logged_lr_is_the_rate_of_that_steps_update(tmp_path):
    """Read after the step, the rate was the next update's: step 1 logged the full rate, which the
    warmup's first update (half of it here) never used."""
    argv = []
    for item in (f"train.out_dir={tmp_path}", "train.steps=6", "train.warmup_steps=2", "train.lr=0.01",
                 "train.min_lr=0.001", "train.eval_every=0", "train.save_every=0", "train.progress=false"):
        argv += ["--set", item]
    run_recipe(ToyConfig, ToyTask, argv)
    factor = warmup_cosine(TrainConfig(steps=6, warmup_steps=2, lr=0.01, min_lr=0.001))
    logged = [row["lr"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    assert logged == pytest.approx([0.01 * factor(update) for update in range(6)], rel=1e-12)
    assert logged[0] == pytest.approx(0.005)


def test_a_schedule_changed_on_resume_sets_the_first_resumed_update_rate(tmp_path):
    """``train.steps`` (and warmup, min_lr) may change on ``--resume``. The optimizer state loads the
    rate the old schedule gave the next update, so the first resumed update ran at it; every
    resumed update now runs at the new schedule's rate for its step."""
    _run(tmp_path, "train.save_every=3", "train.steps=6")
    _run(tmp_path, "train.save_every=3", "train.steps=12", resume=True)  # from the finished step 6
    factor = warmup_cosine(TrainConfig(steps=12, warmup_steps=2, lr=0.01))
    logged = _series(tmp_path, "lr")
    assert [logged[step] for step in range(7, 13)] == pytest.approx([0.01 * factor(s - 1) for s in range(7, 13)], rel=1e-12)


def test_zero3_leaves_torchs_linear_in_place(tmp_path):
    """DeepSpeed's default ``memory_efficient_linear`` replaces ``torch.nn.functional.linear`` for the
    rest of the process whenever ZeRO-3 wraps a model (``zero.Init`` inside ``deepspeed.initialize``
    for a model built whole, as here); the harness's config turns it off."""
    linear = torch.nn.functional.linear
    try:
        _run(tmp_path, "train.zero_stage=3", "train.steps=2", "train.eval_every=0", "train.save_every=0")
        assert torch.nn.functional.linear is linear
    finally:
        torch.nn.functional.linear = linear


def test_warmup_cosine():
    factor = warmup_cosine(TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr=0.1))
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) < 1.0  # the peak is one update, not two
    assert factor(59) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(109) == pytest.approx(0.1)  # the last of 110 updates (0-based) ends at min_lr
    assert all(factor(s) >= 0.1 - 1e-12 for s in range(0, 200))
    assert not math.isnan(factor(10))


def test_validation_positions_spread_over_the_whole_set():
    assert validation_positions(10, 4) == [0, 2, 5, 7]
    assert validation_positions(5, 8) == [0, 1, 2, 3, 4]
    positions = validation_positions(1000, 64)
    assert len(set(positions)) == 64 and positions[0] == 0 and positions[-1] >= 1000 - math.ceil(1000 / 64)


def test_validation_batches_cut_the_spread_positions_in_order():
    assert validation_batches(10, 2, 3) == [[0, 1, 3], [5, 6, 8]]
    assert validation_batches(5, 4, 2) == [[0, 1], [2, 3], [4]]  # the whole set; the last batch short
    for size in range(1, 40):
        for batches, micro in ((1, 1), (3, 4), (5, 8)):
            cut = validation_batches(size, batches, micro)
            assert sum(cut, []) == validation_positions(size, batches * micro)
            assert len(cut) <= batches and all(len(b) == micro for b in cut[:-1])


def test_a_validation_with_fewer_batches_than_ranks_is_said():
    cfg = TrainConfig(micro_batch_size=4, eval_batches=20)
    assert idle_validation_warning(1000, cfg, 16) is None and idle_validation_warning(1000, cfg, 20) is None
    assert idle_validation_warning(1000, cfg, 64) == (
        "warning: validation scores 20 micro-batch(es) on 64 ranks, so 44 rank(s) score none (train.eval_batches "
        "counts micro-batches over all ranks; a multiple of the ranks uses every one)")
    assert "scores 2 micro-batch(es) on 4 ranks" in idle_validation_warning(6, cfg, 4)  # a small set: its batches


def _validating_rank(task, cfg: TrainConfig, rank: int, world: int):
    """A trainer of ``task`` that can validate as ``rank`` of ``world`` (nothing else built)."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.task, trainer.dist = cfg, task, DistInfo(rank, world, rank, torch.device("cpu"))
    return trainer


def _reads_agreed_alone(monkeypatch) -> None:
    """Each agreement on a failure (a batch read, a forward) made as by a world of one (for a rank
    validating alone, its all-reduce stubbed)."""
    monkeypatch.setattr("dyt.train.trainer.failures_agreed", lambda error, words=None: [(0, words)] if error else [])


def _engine_of(task):
    """The task's model as a stand-in for the DeepSpeed engine: what validation asks of one."""
    torch.manual_seed(0)
    engine = task.build_model()
    engine.get_data_types = lambda: (torch.float32, torch.float32)
    return engine


@pytest.mark.parametrize("num_workers", [0, 1])
def test_validation_scores_the_same_batches_and_draws_on_any_world_size(monkeypatch, num_workers):
    """Each rank of a world of 1, 2, 3 or 7 validates alone here (the all-reduce stubbed to hand back
    the rank's own sums): over a world's ranks the counted batches must be the world of one's, each
    once, with the same draws (reading, collating and the loss all draw: ToyDataConfig.eval_noise),
    and every rank must run as many forwards, or a ZeRO-3 collective forward hangs. 5 batches of 4
    (20 of 52 examples; the last of 5 batches short when the set is 18)."""
    config = ToyConfig()
    config.data.examples, config.data.eval_noise, config.model.dropout = 52, 0.5, 0.0
    task = ToyTask(config)
    engine = _engine_of(task)
    scored: list[float] = []  # each forward's batch: the mean of its drawn targets

    def loss(model, batch):
        scored.append(round(batch[1].mean().item(), 6))
        value, extras = ToyTask.loss(task, model, batch)  # + Python's and numpy's draws: seeded alike
        value = value + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return value, {**extras, "target": batch[1].mean().item()}

    monkeypatch.setattr(task, "loss", loss)
    reduced: list[torch.Tensor] = []  # per rank: its example count, then its sums
    monkeypatch.setattr("dyt.train.trainer.all_reduce",
                        lambda value, op="sum": (op == "sum" and reduced.append(value)) or value)
    _reads_agreed_alone(monkeypatch)

    def validate(world: int, size: int) -> tuple[float, int, list[list[float]]]:
        """The world's loss and examples (as the real all-reduce would sum them), and each rank's forwards."""
        config.data.examples = size
        dataset = task.eval_dataset()
        forwards, reduced[:] = [], []
        for rank in range(world):
            trainer = _validating_rank(task, TrainConfig(micro_batch_size=4, eval_batches=5, num_workers=num_workers),
                                       rank, world)
            scored.clear()
            examples = trainer._evaluate(engine, dataset)["examples"]
            forwards.append(list(scored))
        assert len({len(t) for t in reduced[1::2]}) == 1  # every rank reduces loss and target, those without a batch too
        count, totals = sum(reduced[0::2]), sum(reduced[1::2])
        assert count.item() == examples
        return (totals[0] / count).item(), examples, forwards

    for size in (52, 18):
        loss_one, examples, (one,) = validate(1, size)
        assert examples == min(20, size) and len(one) == 5
        for world in (2, 3, 7):
            loss_world, _, forwards = validate(world, size)
            assert len({len(f) for f in forwards}) == 1, (world, [len(f) for f in forwards])  # as many forwards
            counted = [x for r, f in enumerate(forwards) for x in f[:len(range(r, 5, world))]]
            assert sorted(counted) == sorted(one), (world, size)  # each batch once, with the same draws
            assert loss_world == pytest.approx(loss_one, rel=1e-12), (world, size)


def test_validation_batches_by_its_own_micro_batch_size_where_one_is_set(monkeypatch):
    """``eval_micro_batch_size`` decides what validation scores and how it batches it, whatever the
    training micro-batch: halving ``micro_batch_size`` (an out-of-memory resume) with it set to the
    old size scores the same batches with the same draws; unset, validation follows the new size."""
    config = ToyConfig()
    config.data.eval_noise, config.model.dropout = 0.5, 0.0
    task = ToyTask(config)
    engine, dataset = _engine_of(task), task.eval_dataset()
    monkeypatch.setattr("dyt.train.trainer.all_reduce", lambda value, op="sum": value)
    _reads_agreed_alone(monkeypatch)
    sizes: list[int] = []
    real_loss = task.loss
    monkeypatch.setattr(task, "loss", lambda model, batch: sizes.append(len(batch[0])) or real_loss(model, batch))

    def validate(**settings) -> tuple[dict, list[int]]:
        sizes.clear()
        scores = _validating_rank(task, TrainConfig(eval_batches=5, **settings), 0, 1)._evaluate(engine, dataset)
        return scores, list(sizes)

    before, batched = validate(micro_batch_size=8)
    assert batched == [8] * 5 and before["examples"] == 40
    kept, batched = validate(micro_batch_size=4, eval_micro_batch_size=8)
    assert batched == [8] * 5 and kept == before
    followed, batched = validate(micro_batch_size=4)
    assert batched == [4] * 5 and followed["examples"] == 20 and followed["loss"] != before["loss"]
    larger, batched = validate(micro_batch_size=4, eval_micro_batch_size=16)
    assert batched == [16] * 5 and larger["examples"] == 80


def test_the_room_a_save_needs_is_the_newest_checkpoint_without_its_universal_copy(tmp_path, monkeypatch):
    """Before a save, rank 0 wants room for the newest complete checkpoint's files, not counting the
    universal copy a resume on another world size made inside it (not saved again), and counts an
    unfinished save of the same step as free (the save deletes it first)."""
    import collections
    import shutil

    from dyt.train.trainer import NoRoomToSaveError

    root = tmp_path / "checkpoints"
    newest = root / "step_00000002"
    (newest / "universal").mkdir(parents=True)
    (newest / "model.pt").write_bytes(b"x" * 3000)
    (newest / "universal" / "fp32.pt").write_bytes(b"x" * 50_000)
    (newest / "COMPLETE").write_text('{"step": 2, "world_size": 1}')
    leftover = root / "step_00000004"
    leftover.mkdir()
    (leftover / "part.pt").write_bytes(b"x" * 2000)
    trainer = _validating_rank(None, TrainConfig(), 0, 1)
    trainer.ckpt_root = root
    monkeypatch.setattr("dyt.train.trainer.all_reduce", lambda value, op="sum": value)
    usage = collections.namedtuple("usage", "total used free")

    def check_with_free(free: int) -> None:
        monkeypatch.setattr("dyt.train.trainer.shutil.disk_usage", lambda path: usage(10**9, 0, free))
        trainer._check_room_to_save(4)

    check_with_free(1500)  # 1500 + the leftover's 2000 fit the 3000 and the marker
    with pytest.raises(NoRoomToSaveError, match=r"no room to save the checkpoint of step 4 .*: 0\.0 MiB free, the last "
                                                r"checkpoint took 0\.0 MiB; --resume continues from step 2"):
        check_with_free(900)
    shutil.rmtree(leftover)
    with pytest.raises(NoRoomToSaveError):
        check_with_free(1500)
    check_with_free(3100)


def test_an_empty_validation_set_stops_the_run_before_training(tmp_path, capsys):
    class NoValidation(ToyTask):
        def eval_dataset(self):
            return torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1))

    with pytest.raises(SystemExit) as stopped:
        _run(tmp_path / "run", task=NoValidation)
    assert stopped.value.code == 2
    assert "the validation set is empty: give validation data or set train.eval_every=0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert _run(tmp_path / "off", "train.eval_every=0", task=NoValidation).eval_loss is None


def test_validation_stops_when_ranks_report_other_extras(monkeypatch):
    """The ranks reduce one vector of the loss and the extras' sums: if another rank's extras are
    named otherwise (a digest of the names, all-reduced, differs), the sums would be added across
    names; validation stops instead."""
    task = ToyTask(ToyConfig())
    engine = _engine_of(task)
    monkeypatch.setattr("dyt.train.trainer.all_reduce",
                        lambda value, op="sum": value + torch.tensor([1.0, 0.0], dtype=value.dtype) if op == "max" else value)
    _reads_agreed_alone(monkeypatch)
    trainer = _validating_rank(task, TrainConfig(micro_batch_size=4, eval_batches=2), 0, 2)
    with pytest.raises(ValueError, match=r"the task's loss reported other extras on other ranks while validating"):
        trainer._evaluate(engine, task.eval_dataset())


def test_validation_scores_examples_from_the_whole_set_not_its_first(tmp_path):
    """The validation set is stored in document / genome order: with ``eval_batches`` x micro-batch
    below its size, the scored examples must reach its last quarter."""
    seen: list[torch.Tensor] = []

    class Recording(ToyTask):
        def eval_dataset(self):
            return torch.utils.data.TensorDataset(torch.arange(256.0)[:, None].expand(256, 4).contiguous(),
                                                  torch.zeros(256, 1))

        def loss(self, model, batch):
            if not torch.is_grad_enabled():
                seen.append(batch[0][:, 0].clone())
            return super().loss(model, batch)

    run_recipe(ToyConfig, Recording, ["--set", f"train.out_dir={tmp_path}", "--set", "train.steps=1",
                                      "--set", "train.micro_batch_size=4", "--set", "train.eval_batches=4",
                                      "--set", "train.progress=false", "--set", "train.save_every=0"])
    positions = torch.cat(seen).long().tolist()
    assert positions == validation_positions(256, 16) and max(positions) >= 192
    (row,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/loss" in r]
    assert (row["eval/examples"], row["eval/examples_available"]) == (16, 256)  # what the reports state


def test_validation_loss_is_the_mean_over_examples_not_over_batches(tmp_path):
    """10 validation examples in micro-batches of 4: a short last batch of 2 counts as 2 examples.
    The loss here is each batch's mean of its examples' values (9 of 4.0, one of 8.0 at the end),
    so the per-example mean is 4.4 (a mean of the three batch means would say 4.667)."""

    class Uneven(ToyTask):
        def eval_dataset(self):
            values = torch.tensor([4.0] * 9 + [8.0])
            return torch.utils.data.TensorDataset(values[:, None].expand(10, 4).contiguous(), torch.zeros(10, 1))

        def loss(self, model, batch):
            if not torch.is_grad_enabled():
                return batch[0][:, 0].mean() + 0 * sum(p.sum() for p in model.parameters()), {"half": 0.5 * batch[0][:, 0].mean().item()}
            return super().loss(model, batch)

    run_recipe(ToyConfig, Uneven, ["--set", f"train.out_dir={tmp_path}", "--set", "train.steps=1",
                                   "--set", "train.micro_batch_size=4", "--set", "train.eval_batches=8",
                                   "--set", "train.progress=false", "--set", "train.save_every=0"])
    (row,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/loss" in r]
    assert row["eval/examples"] == 10
    assert row["eval/loss"] == pytest.approx(4.4) and row["eval/half"] == pytest.approx(2.2)


class NoisyValidation(ToyTask):
    """A task whose validation loss draws from the global RNGs (torch's, as wav2vec 2.0's crops and
    masks do; Python's and numpy's, as a task's own code might), and whose training loss is scaled by
    draws from Python's and numpy's: a validation that moved those would change the trained weights."""

    def loss(self, model, batch):
        loss, extras = super().loss(model, batch)
        if not torch.is_grad_enabled():
            return loss + torch.rand(()) + random.random() + float(np.random.rand()), extras
        return loss * (1 + 0.1 * random.random() + 0.1 * float(np.random.rand())), extras


def test_validation_draws_are_fixed_and_leave_training_untouched(tmp_path):
    """Every validation scores the same random draws whatever validated before it, and how often a
    run validates changes no trained weight nor training loss (the draws come from seeds per example
    and per batch, and the training RNGs, which the toy's dropout and this task draw from, are put back)."""
    runs = {}
    for eval_every in (1, 4):
        out = tmp_path / f"every{eval_every}"
        run_recipe(ToyConfig, NoisyValidation, [
            "--set", f"train.out_dir={out}", "--set", "train.steps=4", "--set", "train.save_every=4",
            "--set", f"train.eval_every={eval_every}", "--set", "train.lr=0.01",
            "--set", "train.progress=false"])
        runs[eval_every] = out
    every_step = _series(runs[1], "eval/loss")
    assert len(every_step) == 4 and _series(runs[4], "eval/loss") == {4: every_step[4]}
    assert _series(runs[1], "loss") == _series(runs[4], "loss")  # dropout draws unchanged by validating
    for name, weight in _final_weights(runs[1]).items():
        torch.testing.assert_close(weight, _final_weights(runs[4])[name], rtol=0, atol=0)


def _launch(cmd, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_deepspeed_launcher_then_torchrun_resume(tmp_path):
    bindir = Path(sys.executable).parent
    common = [
        "--set", "train.out_dir=run", "--set", "train.zero_stage=2", "--set", "train.save_every=2",
        "--set", "train.eval_every=2", "--set", "train.micro_batch_size=8", "--set", "train.progress=false",
    ]
    _launch([str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(HERE / "toy_recipe.py"),
             *common, "--set", "train.steps=2"], tmp_path)
    ckpt = tmp_path / "run/checkpoints/step_00000002"
    assert json.loads((ckpt / "COMPLETE").read_text()) == {"step": 2, "world_size": 2}
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()

    proc = _launch([str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                    str(HERE / "toy_recipe.py"), *common,
                    "--set", "train.steps=4", "--resume"], tmp_path)
    assert re.search(r"resumed from \S*step_00000002 \(step 2,", proc.stdout), proc.stdout[-2000:]
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "eval/loss" in rows[1] and "eval/loss" in rows[3]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_bf16_run_gives_whole_trained_weights(tmp_path):
    """ZeRO-3 shards every parameter across ranks; trained_weights must gather them whole. (torchrun:
    the launcher changes nothing here, and starts its ranks ~5 s sooner than deepspeed's.)"""
    from dyt.train import trained_weights

    bindir = Path(sys.executable).parent
    _launch([str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(HERE / "toy_recipe.py"),
             "--set", "train.out_dir=run", "--set", "train.zero_stage=3", "--set", "train.precision=bf16",
             "--set", "train.steps=2", "--set", "train.micro_batch_size=8", "--set", "train.progress=false"], tmp_path)
    weights = trained_weights(tmp_path / "run")
    model = ToyTask(ToyConfig()).build_model()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in weights.items()} == expected
    model.load_state_dict(weights)
    assert all(torch.isfinite(v).all() for v in weights.values())
    seed_everything(TrainConfig().seed)  # the harness's initial weights: training must have moved them
    initial = ToyTask(ToyConfig()).build_model().state_dict()
    assert any(not torch.allclose(weights[k].float(), v, atol=1e-3) for k, v in initial.items())


def test_deepspeed_config_derived_then_file_merged_over(tmp_path):
    from dyt.train import deepspeed_config

    derived = deepspeed_config(TrainConfig(micro_batch_size=4, grad_accum=3, zero_stage=1, precision="bf16"))
    assert derived["train_micro_batch_size_per_gpu"] == 4 and derived["gradient_accumulation_steps"] == 3
    assert derived["zero_optimization"] == {"stage": 1, "memory_efficient_linear": False} and derived["bf16"] == {"enabled": True}
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 0.5}))
    merged = deepspeed_config(TrainConfig(deepspeed_config=str(extra)))
    assert merged["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False, "overlap_comm": True}
    assert merged["gradient_clipping"] == 0.5 and merged["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(FileNotFoundError, match="train.deepspeed_config: no such file"):
        deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "missing.json")))


def test_too_small_training_set_is_a_clear_error(tmp_path, capsys):
    """run_recipe is the command line: the error is one line and exit status 2, before the engine."""
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "data.examples=8")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "fewer than one step's batch" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_compare_wall_time_counts_only_launches_that_trained(tmp_path, monkeypatch):
    """A finished run relaunched by a compare (to resume) keeps the wall time it trained in."""
    from dyt.train.compare import run_training

    monkeypatch.setenv("PYTHONPATH", str(HERE))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "toy.yaml"
    config.write_text("train:\n  steps: 2\n  progress: false\n  eval_every: 0\n")
    out = tmp_path / "run"
    first = run_training("toy_recipe", config, out, [], label="toy", seed=0, launcher="python", nproc=1)
    assert first > 0
    again = run_training("toy_recipe", config, out, [], label="toy", seed=0, launcher="python", nproc=1)
    assert again == first
    longer = run_training("toy_recipe", config, out, ["train.steps=3"], label="toy", seed=0,
                          launcher="python", nproc=1)
    assert longer > first


def test_fresh_deletes_its_out_folder_but_never_one_holding_the_working_directory(tmp_path, monkeypatch):
    import argparse

    from dyt.train.compare import CompareError, prepare_out

    out = tmp_path / "runs"
    (out / "old-run").mkdir(parents=True)
    with pytest.raises(CompareError, match=r"holds files that no comparison wrote \(no .in_use, report, summary"):
        prepare_out(argparse.Namespace(out=out, fresh=True))  # a mistyped --out ~: nothing of it deleted
    (out / "report.md").write_text("mine")  # a common name: alone it marks no comparison's folder
    with pytest.raises(CompareError, match="holds files that no comparison wrote"):
        prepare_out(argparse.Namespace(out=out, fresh=True))
    assert (out / "old-run").is_dir()
    (out / "old-run" / "point.json").write_text("{}")  # a run of a comparison older than its lock's file
    prepare_out(argparse.Namespace(out=out, fresh=True))
    assert [p.name for p in out.iterdir()] == [".in_use"]  # the comparison's lock alone (dyt.train.runlock)
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(out)
    for dangerous in (Path("."), tmp_path):
        with pytest.raises(CompareError, match="holds the current directory"):
            prepare_out(argparse.Namespace(out=dangerous, fresh=True))
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_collectives_take_tensors_on_the_device_the_process_group_reduces_on(monkeypatch):
    """On CUDA the group is NCCL's, which takes CUDA tensors only: the harness's loss, validation and
    memory figures are CPU tensors, so its collectives move them to the group's device (a CPU tensor
    there raises "No backend type associated with device type cpu" at the first step)."""
    from dyt.train import distributed

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")

    class Sent(Exception):
        pass

    seen = []

    def collective(*tensors, **_):
        seen.extend(t.device for t in tensors if isinstance(t, torch.Tensor))
        seen.extend(t.device for arg in tensors if isinstance(arg, list) for t in arg)
        raise Sent

    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))  # stands for cuda
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", collective)
    monkeypatch.setattr(torch.distributed, "all_gather", collective)
    for helper in (distributed.all_reduce, distributed.all_gather):
        seen.clear()
        with pytest.raises(Sent):
            helper(torch.ones(2))
        assert seen and all(device.type == "meta" for device in seen), (helper.__name__, seen)


def test_only_the_distributed_helpers_call_collectives():
    """Every collective goes through dyt.train.distributed's helpers, which put tensors on the group's
    device; a direct call elsewhere would hand NCCL a CPU tensor again."""
    calls = re.compile(r"torch\.distributed\.(all_reduce|all_gather|all_gather_into_tensor|reduce_scatter|reduce|gather|scatter|broadcast)\(")
    found = [f"{path}:{n}" for path in sorted(Path(__file__).parents[1].glob("packages/*/src/**/*.py"))
             if path.name != "distributed.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    assert not found, found


def test_a_checkpoint_is_on_disk_before_it_is_marked_complete(tmp_path, monkeypatch):
    """DeepSpeed writes its shards without fsync: the harness flushes every file of the checkpoint
    (each rank its own view) before the marker that makes it the one a resume takes."""
    from dyt.train import checkpoint

    flushed = []
    real = checkpoint._fsync_tree

    def spy(directory):
        assert not (directory / checkpoint.MARKER).exists()
        files = {p.name for p in directory.iterdir()}
        assert any(name.endswith("model_states.pt") for name in files) and "rng_rank0.pt" in files, files
        real(directory)
        flushed.append(directory.name)

    monkeypatch.setattr(checkpoint, "_fsync_tree", spy)
    _run(tmp_path / "run")
    assert flushed == ["step_00000004", "step_00000008"]


def test_a_resume_on_another_global_batch_says_so_and_what_keeps_it(tmp_path):
    """After a lost node the same config trains fewer examples per step under a schedule that runs by
    step: the resume warns, naming the grad_accum that keeps the checkpoint's global batch. The batch
    compared is the saving launch's (from the launch record), not a later launch's that died unsaved."""
    from dyt.train import TrainConfig
    from dyt.train.trainer import global_batch_change

    (tmp_path / "config.yaml").write_text("train:\n  micro_batch_size: 4\n  grad_accum: 1\n")
    said = global_batch_change(tmp_path, 100, 16, TrainConfig(micro_batch_size=4), 8)
    assert said.startswith("warning: global batch 64 -> 32 examples per step (micro_batch_size x ranks x grad_accum: "
                           "4 x 16 x 1 -> 4 x 8 x 1)") and said.endswith(
        "--set train.grad_accum=2 keeps it (train.global_batch_size: 64 keeps it on every rank count that divides it)")
    assert global_batch_change(tmp_path, 100, 16, TrainConfig(micro_batch_size=4, grad_accum=2), 8) is None
    assert global_batch_change(tmp_path, 100, 16, TrainConfig(micro_batch_size=4), 5).endswith(
        "; no setting keeps it at this micro-batch size and rank count")
    # launched at step 0 with grad_accum 2 (saved step 100), relaunched at 100 with 4, killed before saving:
    # config.yaml holds the dead launch's 4; the checkpoint was made with 2
    launches = [{"step": 0, "world_size": 16, "config": {"train": {"micro_batch_size": 4, "grad_accum": 2}}},
                {"step": 100, "world_size": 16, "config": {"train": {"micro_batch_size": 4, "grad_accum": 4}}}]
    (tmp_path / "launches.jsonl").write_text("".join(json.dumps(row) + "\n" for row in launches))
    assert global_batch_change(tmp_path, 100, 16, TrainConfig(micro_batch_size=4, grad_accum=2), 16) is None
    assert "128 -> 64" in global_batch_change(tmp_path, 100, 16, TrainConfig(micro_batch_size=4, grad_accum=1), 16)
    # saved with a global batch of 128 on 16 ranks (grad_accum derived: 2), resumed on 8 with the same setting
    (tmp_path / "launches.jsonl").unlink()
    (tmp_path / "config.yaml").write_text("train:\n  micro_batch_size: 4\n  global_batch_size: 128\n")
    kept = TrainConfig(micro_batch_size=4, global_batch_size=128)
    assert global_batch_change(tmp_path, 100, 16, kept.for_world(8), 8) is None
    said = global_batch_change(tmp_path, 100, 16, TrainConfig(micro_batch_size=4, global_batch_size=64).for_world(8), 8)
    assert "global batch 128 -> 64 examples per step (micro_batch_size x ranks x grad_accum: 4 x 16 x 2 -> 4 x 8 x 2)" in said
    assert said.endswith("--set train.global_batch_size=128 keeps it")
    said = global_batch_change(tmp_path, 100, 16, TrainConfig(micro_batch_size=4, global_batch_size=24).for_world(3), 3)
    assert "128 -> 24" in said and said.endswith("no setting keeps it at this micro-batch size and rank count")


def test_the_data_order_is_a_tensor_read_in_blocks_and_the_order_it_always_was(monkeypatch):
    """The epoch's order is kept as an int32 tensor (a list of ints took ~52 bytes an example), read
    by the sampler a block at a time, and is the order the list gave: a run saved before resumes on
    the same examples."""
    from dyt.train import DistInfo, TrainConfig
    from dyt.train.trainer import IndexSampler, ResumableBatches

    monkeypatch.setattr(IndexSampler, "BLOCK", 7)  # several blocks, one cut short
    examples = list(range(100))
    task = type("Collate", (), {"collate": staticmethod(torch.tensor)})()
    cfg = TrainConfig(micro_batch_size=4, seed=3)
    for rank in range(2):
        batches = ResumableBatches(examples, task, cfg, DistInfo(rank, 2, rank, torch.device("cpu")))
        assert batches._order(1).dtype == torch.int32
        read = [b.tolist() for b, _ in zip(batches.iterate(DataPosition()), range(2 * batches.per_epoch))]
        listed = [torch.randperm(100, generator=torch.Generator().manual_seed(3 * 1_000_003 + e)).tolist()
                  for e in (0, 1)]  # the old order: a list of every index
        mine = [i for order in listed for i in order[:batches.usable][rank::2]]
        assert sum(read, []) == mine
        assert all(type(i) is int for i in IndexSampler(torch.arange(10, dtype=torch.int32)))


def test_ranks_wait_for_the_universal_conversion_on_disk_not_in_a_collective(tmp_path, capsys):
    """Rank 0 converts a ZeRO checkpoint for another world size alone, for longer than a process
    group's timeout at 7B: the others wait for its marker file, and stop at once on its failure."""
    import threading

    from dyt.train.checkpoint import UniversalConversionError, wait_for_conversion

    marker, failed = tmp_path / "universal" / "COMPLETE", tmp_path / "universal.failed"
    marker.parent.mkdir()
    threading.Timer(0.3, marker.write_text, args=("{}",)).start()
    wait_for_conversion(marker, failed, poll_s=0.05, say_every_s=0.1)
    assert "waiting for rank 0's universal checkpoint" in capsys.readouterr().out
    marker.unlink()
    threading.Timer(0.2, failed.write_text, args=("OSError: disk full",)).start()
    with pytest.raises(UniversalConversionError, match="could not convert .* OSError: disk full") as caught:
        wait_for_conversion(marker, failed, poll_s=0.05)
    assert caught.value.every_rank  # rank 0 says why; the others stop quietly
    failed.unlink()
    with pytest.raises(UniversalConversionError, match=r"did not convert .* in 0 s \(killed\?") as caught:
        wait_for_conversion(marker, failed, poll_s=0.05, give_up_s=0.2)  # rank 0 gone without a word
    assert not caught.value.every_rank  # no rank 0 left to say it: each waiting rank does


def test_a_failed_universal_conversion_is_one_line_on_rank_0_and_stops_the_others(tmp_path, monkeypatch, capsys):
    """A full disk during rank 0's conversion (it writes ~12 bytes a parameter) was a traceback on
    rank 0 and RuntimeError tracebacks on the others; its half-written copy stayed. Now one line that
    says what to do, a failure file the waiting ranks stop on, and no partial folder."""
    from deepspeed.checkpoint import ds_to_universal

    from dyt.errors import one_line
    from dyt.train import checkpoint

    directory = tmp_path / "checkpoints" / "step_00000003"
    directory.mkdir(parents=True)
    (directory / checkpoint.MARKER).write_text('{"step": 3, "world_size": 2}')

    def full_disk(args):
        Path(args.output_folder, "zero").mkdir(parents=True)
        print("extracting shards", flush=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ds_to_universal, "main", full_disk)
    monkeypatch.setattr(checkpoint, "barrier", lambda: None)
    with pytest.raises(checkpoint.UniversalConversionError) as caught:
        checkpoint.convert_to_universal(directory, DistInfo(0, 1, 0, torch.device("cpu")))
    assert one_line("dyt_llama.train", caught.value) == (
        f"dyt_llama.train: checkpoint error: could not convert {directory} to a universal checkpoint for 1 rank(s) "
        "(OSError: [Errno 28] No space left on device; the converter's output is above): it writes the fp32 weights "
        "and both Adam moments whole, ~12 bytes a parameter and more while it runs, beside the checkpoint; free disk "
        "space there and resume again, or resume on 2 rank(s), which loads the checkpoint as saved")
    assert "extracting shards" in capsys.readouterr().out
    assert sorted(p.name for p in directory.iterdir()) == [checkpoint.MARKER, "universal.failed"]
    with pytest.raises(checkpoint.UniversalConversionError, match="rank 0 could not convert .*No space left"):
        checkpoint.wait_for_conversion(directory / "universal" / checkpoint.MARKER, directory / "universal.failed",
                                       poll_s=0.05)


def test_a_rank_restores_the_cuda_rng_of_its_own_device_only(monkeypatch):
    """Saving every visible device's CUDA RNG and restoring them all raised an IndexError where a
    resume sees fewer devices per process; each rank keeps and restores its own device's. A state
    saved the old way is restored where the devices are as many as then, else left as seeded."""
    from dyt.train import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state.tolist()))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append([s.tolist() for s in states]))
    state = checkpoint.rng_state()
    checkpoint.set_rng_state(state)
    older = {**state, "cuda": [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]}
    del older["cuda_device"]
    checkpoint.set_rng_state(older)  # as many devices as the save saw: every one as saved
    checkpoint.set_rng_state({**older, "cuda": older["cuda"] * 4})  # saved by 8 devices, 2 seen now: left
    assert restored == [[7], [[1], [2]]]


def test_a_checkpoint_that_does_not_load_is_named_in_one_line(tmp_path):
    """A complete checkpoint without its model states stops --resume with the folder named (DeepSpeed
    asserted, a traceback); a damaged weights file stops an eval so too (torch.load's EOFError); and
    load_state_dict's message keeps its first detail, not only its "Error(s) in loading ...:" line."""
    import torch

    from dyt.train import checkpoint
    from dyt.train.distributed import DistInfo

    folder = tmp_path / "run" / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text('{"step": 2, "world_size": 1}')
    with pytest.raises(checkpoint.RunNotFoundError, match="step_00000002: marked complete but holds no model states"):
        checkpoint.load(None, folder, DistInfo(0, 1, 0, torch.device("cpu")))  # checked before the engine is asked
    with pytest.raises(checkpoint.RunNotFoundError, match="holds no model states"):
        checkpoint.trained_weights(tmp_path / "run")
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02")  # cut short
    with pytest.raises(checkpoint.CheckpointLoadError, match="step_00000002 is marked complete but its weights do not "
                                                            "load .*: if a file in it was damaged"):
        checkpoint.trained_weights(tmp_path / "run")
    torch.save({"module": torch.nn.Linear(2, 3).state_dict()}, folder / "mp_rank_00_model_states.pt")
    build = checkpoint.run_model_builder(tmp_path / "run", lambda: torch.nn.Linear(2, 4))
    with pytest.raises(checkpoint.CheckpointLoadError, match=r"do not fit the model its config.yaml builds \(Error\(s\) "
                                                            r"in loading state_dict for Linear: size mismatch for weight"):
        build()
    assert isinstance(checkpoint.run_model_builder(tmp_path / "run", lambda: torch.nn.Linear(2, 3))(), torch.nn.Linear)
    assert checkpoint.error_gist(ValueError("")) == "ValueError"
    assert checkpoint.error_gist(AssertionError("no shards")) == "AssertionError: no shards"  # DeepSpeed's, or a bug
    long = checkpoint.error_gist(RuntimeError("Error(s) in loading:\n\tMissing key(s): " + "layer.weight, " * 100))
    assert len(long) == 300 and long.startswith("Error(s) in loading: Missing key(s): layer.weight,") and long.endswith("...")
