"""One writer per run folder and per comparison folder, and the run records a kill can cut short."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dyt.train import run_recipe, runlock
from dyt.train.checkpoint import LAUNCHES, record_launch, recorded_launches
from dyt.train.metrics import MetricsLogger, read_metrics

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from toy_recipe import ToyConfig, ToyTask  # noqa: E402


class _Holder:
    """Another process holding ``folder``'s lock until it is stopped."""

    def __init__(self, folder: Path, what: str):
        code = textwrap.dedent(f"""
            import sys
            from dyt.train import runlock
            with runlock.holding({str(folder)!r}, {what!r}):
                print("held", flush=True)
                sys.stdin.read()
        """)
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


def _train(out_dir: Path, resume: bool = False, steps: int = 2):
    argv = ["--set", f"train.out_dir={out_dir}", "--set", f"train.steps={steps}", "--set", "train.save_every=2",
            "--set", "train.micro_batch_size=16", "--set", "train.progress=false"]
    return run_recipe(ToyConfig, ToyTask, argv + (["--resume"] if resume else []))


def test_a_second_launch_into_a_run_folder_stops_with_one_line_naming_the_holder(tmp_path, capsys):
    holder = _Holder(tmp_path / "run", "launch")
    try:
        with pytest.raises(SystemExit) as stopped:
            _train(tmp_path / "run")
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"folder in use: {tmp_path / 'run'} is being written by another launch (host " in err, err
        assert f"pid {holder.process.pid}, since " in err, err
        assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.stop()
    assert _train(tmp_path / "run").step == 2  # the kernel dropped the lock with its holder
    with runlock.holding(tmp_path / "run", "launch"):  # and the finished launch released its own
        pass


def test_a_comparison_holds_its_out_folder_and_fresh_keeps_only_the_lock(tmp_path):
    from dyt.train.compare import prepare_out

    out = tmp_path / "runs"
    (out / "old-run").mkdir(parents=True)
    holder = _Holder(out, "comparison")
    try:
        with pytest.raises(runlock.FolderInUseError, match="being written by another comparison"):
            prepare_out(argparse.Namespace(out=out, fresh=True))
        assert (out / "old-run").is_dir()  # nothing deleted under the live comparison
    finally:
        holder.stop()
    prepare_out(argparse.Namespace(out=out, fresh=True))
    assert [p.name for p in out.iterdir()] == [runlock.LOCK_FILE]
    prepare_out(argparse.Namespace(out=out, fresh=False))  # the process holding it may take it again


def test_another_process_cannot_take_a_comparisons_out_folder(tmp_path):
    from dyt.train.compare import prepare_out

    out = tmp_path / "runs"
    prepare_out(argparse.Namespace(out=out, fresh=False))
    taken = subprocess.run(
        [sys.executable, "-c", f"from dyt.train import runlock; runlock.hold_for_process({str(out)!r}, 'comparison')"],
        capture_output=True, text=True)
    assert taken.returncode != 0 and f"pid {os.getpid()}, since" in taken.stderr, taken.stderr


def test_a_launch_record_cut_short_is_read_up_to_the_cut_and_appended_after(tmp_path):
    record_launch(tmp_path, 0, 2, ToyConfig())
    path = tmp_path / LAUNCHES
    whole = path.read_text()
    path.write_text(whole + whole[: len(whole) // 2])  # a second launch killed while recording itself
    assert [row["step"] for row in recorded_launches(tmp_path)] == [0]
    record_launch(tmp_path, 4, 1, ToyConfig())
    assert [(row["step"], row["world_size"]) for row in recorded_launches(tmp_path)] == [(0, 2), (4, 1)]
    path.write_text(whole[: len(whole) // 2] + "\n" + whole)  # damaged inside: still an error
    with pytest.raises(ValueError, match="a launch this code cannot read"):
        recorded_launches(tmp_path)


def test_resume_rewrites_metrics_only_to_drop_rows_and_renames_them_into_place(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(tmp_path, True, False)
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": float(step)})
    before = path.stat().st_ino
    MetricsLogger(tmp_path, True, False, resume_step=3)  # nothing past the checkpoint: the file is left alone
    assert path.stat().st_ino == before
    MetricsLogger(tmp_path, True, False, resume_step=2)
    assert [row["step"] for row in read_metrics(path)] == [1, 2] and path.stat().st_ino != before
    assert not list(tmp_path.glob("*.tmp"))


def test_a_cached_tokenizer_cut_short_is_trained_again(tmp_path):
    datasets = pytest.importorskip("datasets")
    from dyt_llama.data import DataConfig, load_tokenizer

    docs = datasets.Dataset.from_dict({"text": ["to be or not to be, that is the question"] * 20})
    cfg = DataConfig(cache_dir=str(tmp_path))
    first = load_tokenizer(cfg, docs, 300, content_key="k")
    (cached,) = (tmp_path / "tokenizers").glob("*.json")
    cached.write_text(cached.read_text()[:100])  # as a kill during the save used to leave it
    again = load_tokenizer(cfg, docs, 300, content_key="k")
    assert again.to_str() == first.to_str()
    assert json.loads(cached.read_text()) == json.loads(first.to_str())
    assert not list((tmp_path / "tokenizers").glob("*.tmp"))


def test_ranks_that_see_different_newest_checkpoints_stop_before_loading(tmp_path, monkeypatch, capsys):
    """A train.out_dir on each node's own disk: only rank 0's node sees the COMPLETE marker."""
    import torch

    from dyt.train import trainer

    _train(tmp_path / "run")
    real = trainer.all_reduce

    def another_rank_sees_no_checkpoint(value, op="sum"):
        if op == "max" and value.numel() == 2:
            return torch.maximum(real(value, op), torch.tensor([-1.0, 1.0], dtype=value.dtype))
        return real(value, op)

    monkeypatch.setattr(trainer, "all_reduce", another_rank_sees_no_checkpoint)
    with pytest.raises(SystemExit) as stopped:
        _train(tmp_path / "run", resume=True, steps=4)
    assert stopped.value.code == 2
    assert ("the ranks see different newest complete checkpoints in " f"{tmp_path / 'run' / 'checkpoints'} (none on "
            "some, step 2 on others): train.out_dir must be on a file system every node shares") in capsys.readouterr().err


def test_an_eval_says_which_checkpoint_it_reads_and_that_a_launch_is_writing_the_run(tmp_path):
    """The evals read the newest complete checkpoint and said nothing of it: an unfinished run, a run
    stopped by a divergence, or one still training was evaluated at an earlier step without a word.
    The line names the step of train.steps and each of those, and asking for the lock does not take it."""
    from dyt.train.checkpoint import DIVERGED, evaluated_checkpoint

    run = tmp_path / "run"
    _train(run, steps=2)
    assert evaluated_checkpoint(run, 2) == (2, f"{run}: checkpoint step 2 of 2")
    assert evaluated_checkpoint(run, 10)[1] == f"{run}: checkpoint step 2 of 10 (the run is unfinished: --resume it to train on)"
    (run / DIVERGED).write_text(json.dumps({"step": 3, "loss": "nan", "last_good": "x", "world_size": 1, "config": {}}))
    assert evaluated_checkpoint(run, 10)[1].endswith("(the run diverged at step 3: this is its last good checkpoint)")
    (run / DIVERGED).unlink()
    assert runlock.holder(run) is None and runlock.holder(tmp_path / "no-such-run") is None
    holder = _Holder(run, "launch")
    try:
        line = evaluated_checkpoint(run, 2)[1]
        assert "; a training launch is writing the run now (host " in line and f"pid {holder.process.pid}" in line, line
        assert runlock.holder(run) is not None  # asked twice: the question took no lock the holder could lose
    finally:
        holder.stop()
    assert runlock.holder(run) is None
    with runlock.holding(run, "launch"):  # nothing left held by the question
        pass


def test_a_checkpoint_pruned_while_an_eval_reads_it_is_said_so(tmp_path, monkeypatch):
    """A launch training the run on deletes its older checkpoints: one read by an eval meanwhile gave
    "marked complete but its weights do not load ... delete that folder", of a folder already gone."""
    import shutil

    import torch

    from dyt.train.checkpoint import CheckpointLoadError, trained_weights

    run = tmp_path / "run"
    _train(run, steps=2)
    newest = run / "checkpoints" / "step_00000002"

    def pruned_meanwhile(path, *args, **kwargs):
        shutil.rmtree(newest)
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(torch, "load", pruned_meanwhile)
    with pytest.raises(CheckpointLoadError, match="step_00000002 was deleted while its weights were read"):
        trained_weights(run)


def test_an_eval_reads_the_checkpoint_it_names_whatever_is_saved_meanwhile(tmp_path):
    """An eval names the checkpoint it reads in its results; a launch training the run on saved newer
    ones meanwhile, and the weights read were the newest: results of one checkpoint under another's
    step. Pinned, the named one is read, and one pruned meanwhile is said so."""
    from dyt.train.checkpoint import CheckpointLoadError, checkpoint_pinned, trained_weights

    run = tmp_path / "run"
    _train(run, steps=4)  # checkpoints of steps 2 and 4
    newest, older = trained_weights(run), None
    with checkpoint_pinned(run, 2):
        older = trained_weights(run)
        assert trained_weights(tmp_path / ".." / tmp_path.name / "run").keys() == older.keys()  # any spelling of it
    assert any(not torch.equal(older[name], newest[name]) for name in newest)
    assert all(torch.equal(trained_weights(run)[name], newest[name]) for name in newest)  # the pin ends with its block
    with checkpoint_pinned(run, 6), pytest.raises(CheckpointLoadError, match="step_00000006, the checkpoint this eval "
                                                                           "reads, is gone"):
        trained_weights(run)


def test_a_launch_is_not_refused_while_an_eval_asks_who_writes_the_run(tmp_path):
    """``holder`` holds a shared lock for a moment; a launch starting then was refused, naming the
    last writer (perhaps long gone). The launch tries again for a moment before refusing."""
    import fcntl
    import threading

    run = tmp_path / "run"
    with runlock.holding(run, "launch"):
        pass
    fd = os.open(run / runlock.LOCK_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what holder() takes while it asks
    threading.Timer(0.15, os.close, args=(fd,)).start()
    with runlock.holding(run, "launch"):
        pass
