"""Distributed correctness of the shared harness: what each rank reads, 2 ranks against 1 rank with
gradient accumulation, and a 2-rank LLaMA run resumed from a checkpoint against the uninterrupted run.

The data order (trainer.ResumableBatches): each epoch is one seeded permutation of the training set,
cut to a multiple of the global batch ``micro_batch * world * grad_accum``; rank r reads every
world-th example of it from position r, in micro-batches. So step k of a 2-rank run with micro-batch
m reads positions [2mk, 2m(k+1)) of the permutation (rank 0 the even ones, rank 1 the odd ones), and
step k of a 1-rank run with grad_accum 2 reads the same positions as its two micro-batches: the same
examples per step, hence the same loss curve, over epoch boundaries too (both cut the epoch at the
same place; before 2026-12-06 the cut was a multiple of ``micro_batch * world``, and the two runs
parted at the first boundary unless the training set was a multiple of world * micro_batch).
"""

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dyt.errors import UserInputError
from dyt.train import DistInfo, TrainConfig, read_metrics, run_recipe
from dyt.train.distributed import LaunchEnvironmentError, free_port, launcher_number, shm_allreduce_buffer
from dyt.train.trainer import DataPosition, ResumableBatches

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from toy_recipe import ToyConfig, ToyTask  # noqa: E402


class _Indices:
    """A task whose examples are their own indices, to see which ones each rank reads."""

    @staticmethod
    def collate(items):
        return list(items)


def _streams(examples: int, micro_batch: int, world: int, micro_batches: int, start: int = 0) -> list[list[list[int]]]:
    """Per rank, ``micro_batches`` micro-batches of example indices from micro-batch ``start`` on."""
    cfg = TrainConfig(micro_batch_size=micro_batch, seed=3)
    epoch, offset = divmod(start, examples // (micro_batch * world))
    position = DataPosition(epoch, offset * micro_batch * world)
    out = []
    for rank in range(world):
        batches = ResumableBatches(list(range(examples)), _Indices(), cfg, DistInfo(rank, world, rank, torch.device("cpu")))
        stream = batches.iterate(position)
        out.append([next(stream) for _ in range(micro_batches)])
    return out


class _RandomCollate:
    """A collate that draws from the RNG, as wav2vec 2.0's random crops do."""

    @staticmethod
    def collate(items):
        return torch.rand(len(items)).tolist()


def test_data_loading_workers_draw_per_seed_and_rank():
    """With ``num_workers`` > 0 the collate runs in workers seeded from the loader's generator: their
    draws must differ between run seeds and between ranks, as the main process's do."""
    draws = {}
    for seed in (0, 1, 2**32 - 1):  # the largest seed a run takes
        for rank in (0, 1):
            cfg = TrainConfig(micro_batch_size=4, seed=seed, num_workers=1)
            batches = ResumableBatches(list(range(32)), _RandomCollate(), cfg,
                                       DistInfo(rank, 2, rank, torch.device("cpu")))
            draws[seed, rank] = next(batches.iterate(DataPosition()))
    assert len({tuple(d) for d in draws.values()}) == 6, draws


@pytest.mark.parametrize("examples", [256, 100], ids=["multiple-of-16", "remainder"])
def test_ranks_read_disjoint_data_covering_each_epoch_once(examples):
    micro_batch, world = 8, 2
    per_epoch = examples // world // micro_batch  # micro-batches per rank per epoch
    usable = per_epoch * micro_batch * world
    epochs = 3
    rank0, rank1 = _streams(examples, micro_batch, world, per_epoch * epochs)
    orders = []
    for epoch in range(epochs):
        part = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        read0 = [i for batch in rank0[part] for i in batch]
        read1 = [i for batch in rank1[part] for i in batch]
        assert not set(read0) & set(read1)  # no example read by both ranks in the epoch (so in no step)
        assert sorted(read0 + read1) == sorted(set(read0 + read1))  # nor twice by one rank
        assert len(read0) == len(read1) == usable // world  # every usable example once per epoch
        assert set(read0 + read1) <= set(range(examples))
        orders.append(read0 + read1)
    assert len({tuple(order) for order in orders}) == epochs  # reshuffled every epoch, no order repeated
    # A resumed run starts at any micro-batch and reads what the uninterrupted run read from there on.
    for start in (1, per_epoch, per_epoch + 2):
        resumed = _streams(examples, micro_batch, world, 4, start)
        assert resumed == [rank0[start : start + 4], rank1[start : start + 4]]


def test_a_step_reads_the_same_examples_on_another_world_size_across_epochs():
    """The epoch is cut to a multiple of the global batch, not of one micro-batch step over the ranks:
    4 ranks x 8 and 2 ranks x 4 x grad_accum 4 (a resume after losing half the ranks, same global
    batch 32) cut 1000 examples alike (992) and read the same examples in every step, over epoch
    boundaries too (cut at 992 and 1000 before, every step after the first boundary moved by 8)."""

    def steps(world: int, micro_batch: int, grad_accum: int, count: int) -> list[list[int]]:
        cfg = TrainConfig(micro_batch_size=micro_batch, grad_accum=grad_accum, seed=3)
        streams = [ResumableBatches(list(range(1000)), _Indices(), cfg, DistInfo(rank, world, rank, torch.device("cpu")))
                   .iterate(DataPosition()) for rank in range(world)]
        return [sorted(i for _ in range(grad_accum) for stream in streams for i in next(stream)) for _ in range(count)]

    four, two = steps(4, 8, 1, 70), steps(2, 4, 4, 70)  # 31 steps an epoch: past two boundaries
    assert four == two
    assert all(len(step) == len(set(step)) == 32 for step in four)
    with pytest.raises(UserInputError, match=r"^the training set has 1000 examples: fewer than one step's batch "
                                             r"\(8 x 2 rank\(s\) x grad_accum 64 = 1024\); lower"):
        ResumableBatches(list(range(1000)), _Indices(), TrainConfig(micro_batch_size=8, grad_accum=64),
                         DistInfo(0, 2, 0, torch.device("cpu")))


class _LengthIndices(_Indices):
    """Indices whose lengths the task gives (``train_lengths``), as wav2vec 2.0's clips."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def train_lengths(self) -> list[int]:
        return self.lengths


def test_a_task_with_lengths_gets_global_batches_of_like_length_on_any_world_size():
    """With ``train_lengths`` each epoch keeps the examples it would keep without, regrouped into
    global batches that each cover a run of the epoch's lengths in sorted order (so no two batches
    overlap in length), in a fresh random order per epoch; and a step reads the same examples on
    4 ranks x 8 as on 2 ranks x 4 x grad_accum 4."""
    lengths = [(i * 7919) % 97 for i in range(1000)]  # 97 distinct lengths, ~10 examples each

    def steps(task, world: int, micro_batch: int, grad_accum: int, count: int, start: DataPosition | None = None):
        cfg = TrainConfig(micro_batch_size=micro_batch, grad_accum=grad_accum, seed=3)
        streams = [ResumableBatches(list(range(1000)), task, cfg, DistInfo(rank, world, rank, torch.device("cpu")))
                   .iterate(start or DataPosition()) for rank in range(world)]
        return [sorted(i for _ in range(grad_accum) for stream in streams for i in next(stream)) for _ in range(count)]

    four = steps(_LengthIndices(lengths), 4, 8, 1, 62)  # two epochs of 31 steps
    assert four == steps(_LengthIndices(lengths), 2, 4, 4, 62)
    assert four[10:40] == steps(_LengthIndices(lengths), 2, 4, 4, 30, DataPosition(0, 320))  # resumed at step 10
    plain = steps(_Indices(), 4, 8, 1, 62)
    for epoch in range(2):
        batches = four[31 * epoch : 31 * (epoch + 1)]
        assert sorted(i for b in batches for i in b) == sorted(i for b in plain[31 * epoch : 31 * (epoch + 1)] for i in b)
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
        assert all(high <= low for (_, high), (low, _) in zip(spans, spans[1:])), spans  # like length
    assert four[:31] != four[31:] and [min(lengths[i] for i in b) for b in four[:8]] != sorted(
        min(lengths[i] for i in b) for b in four[:8])  # batches in random order, reshuffled per epoch
    with pytest.raises(ValueError, match="gave \\(999,\\) lengths for 1000 examples"):
        ResumableBatches(list(range(1000)), _LengthIndices(lengths[1:]), TrainConfig(), DistInfo(0, 1, 0, torch.device("cpu")))


def test_two_ranks_read_per_step_what_one_rank_reads_with_grad_accum_2():
    """Same examples per optimizer step over several epochs (256 examples: a multiple of 2 x 8)."""
    steps = 3 * 256 // 16
    rank0, rank1 = _streams(256, 8, 2, steps)
    (single,) = _streams(256, 8, 1, 2 * steps)
    for step in range(steps):
        assert sorted(rank0[step] + rank1[step]) == sorted(single[2 * step] + single[2 * step + 1]), step


def test_a_data_position_reads_on_from_the_same_example_on_another_world_size():
    """The position a checkpoint saves counts examples over all ranks, so a run resumed on another
    world size reads on where the saved run stopped: from there, a 1-rank step of 2 micro-batches
    reads exactly what a 2-rank step reads, also from a position that is no multiple of 2 ranks x
    8 (3 micro-batches of 1 rank), and across the epoch boundary. An epoch left with less than one
    micro-batch step over all ranks goes on with the next epoch (90 examples: 1 rank uses 88 an
    epoch, 2 ranks 80; ResumableBatches' docstring)."""
    cfg = TrainConfig(micro_batch_size=8, seed=3)

    def positions_read(world: int, start: DataPosition, micro_batches: int, examples: int = 256):
        streams = []
        for rank in range(world):
            batches = ResumableBatches(list(range(examples)), _Indices(), cfg, DistInfo(rank, world, rank, torch.device("cpu")))
            stream = batches.iterate(start)
            streams.append([next(stream) for _ in range(micro_batches)])
        return streams, batches.position

    for start in (DataPosition(0, 48), DataPosition(0, 24), DataPosition(1, 224)):
        (one,), one_end = positions_read(1, start, 2 * 6)
        two, two_end = positions_read(2, start, 6)
        for step in range(6):
            assert sorted(two[0][step] + two[1][step]) == sorted(one[2 * step] + one[2 * step + 1]), (start, step)
        assert one_end == two_end
    # From a position the new world's steps do not divide, the epoch's last 8 examples (less than one
    # 2-rank step of 16) are skipped once: 232 -> 248, then epoch 1.
    assert positions_read(2, DataPosition(0, 232), 2)[1] == DataPosition(1, 16)
    (_, two_end) = positions_read(2, DataPosition(0, 88), 1, examples=90)
    assert two_end == DataPosition(1, 16)
    (one,), one_end = positions_read(1, DataPosition(0, 80), 1, examples=90)
    assert one_end == DataPosition(0, 88)


def _launch(cmd, cwd, **env):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(HERE), **env}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _series(out_dir, key):
    return {row["step"]: row[key] for row in read_metrics(Path(out_dir) / "metrics.jsonl") if key in row}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_follow_the_loss_curve_of_one_rank_with_grad_accum_2(tmp_path):
    """2 ranks x micro-batch 8 against 1 rank x grad_accum 2 x micro-batch 8: the same examples per
    step (64 examples, a multiple of 2 x 8, see the module docstring; 4 steps an epoch, so the 8
    steps cross an epoch boundary), dropout off, gradients averaged over ranks in one and over
    micro-batches in the other, so the same updates up to float rounding. Validation: 5 batches of
    8 of the 64 examples, 3 on rank 0 and 2 on rank 1, with random draws in reading, collating and
    the loss (``data.eval_noise``), read by a data-loading worker on 2 ranks and in the main process
    on 1: the same examples and draws, so the same validation loss.

    DeepSpeed's CPU accelerator maps a 66 MiB all-reduce workspace per rank from /dev/shm and never
    unlinks it: every launch used to leave world size x 66 MiB of RAM behind until reboot. The
    harness unlinks each rank's name once all ranks have mapped them: the 2-rank launch leaves none."""
    common = ["train.steps=8", "train.micro_batch_size=8", "train.lr=0.01", "train.warmup_steps=2",
              "train.eval_every=4", "train.eval_batches=5", "train.save_every=0", "train.progress=false",
              "train.tensorboard=false", "model.dropout=0.0", "data.examples=64", "data.eval_noise=0.5"]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    two_ranks = ["train.out_dir=two", "train.grad_accum=1", "train.num_workers=1"]
    port = free_port()
    _launch([deepspeed, "--num_gpus", "2", "--master_port", str(port), str(HERE / "toy_recipe.py"),
             *(arg for item in common + two_ranks for arg in ("--set", item))], tmp_path)
    left = [path for path in (shm_allreduce_buffer("127.0.0.1", str(port), rank) for rank in (0, 1)) if path.exists()]
    assert not left, f"left in /dev/shm: {left}"
    run_recipe(ToyConfig, ToyTask, [arg for item in common + [f"train.out_dir={tmp_path / 'one'}", "train.grad_accum=2"]
                                    for arg in ("--set", item)])
    for key in ("train/loss", "eval/loss", "alpha/1"):
        two, one = _series(tmp_path / "two", key), _series(tmp_path / "one", key)
        assert two.keys() == one.keys() and len(two) >= 2, key
        for step in two:
            assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-7), (key, step, two[step], one[step])
    alphas = _series(tmp_path / "one", "alpha/1")
    assert abs(alphas[8] - alphas[1]) > 1e-4  # it trained: the comparison is not of two frozen runs


TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_llama_resumed_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path):
    """An uninterrupted 2-rank run of 4 steps checkpoints at steps 2 and 4. A copy of it cut back to
    step 2 (the step-4 checkpoint deleted, as if the run had died after saving step 2; its metrics
    rows 3-4 are the resume's to drop) resumes with the same config: its steps 3 and 4 must repeat
    the uninterrupted run's (losses, validation, DyT alphas) to float tolerance. Same config, so
    the LR schedule is the same (a resume that raises train.steps: tests/test_harness.py's 2-rank toy
    launcher test, and tests/test_scale.py's in one process). Also the LLaMA recipe's 2-rank
    deepspeed launch: both launches log perplexity and each rank's peak RSS, and record the corpus
    files they read."""
    corpus = tmp_path / "corpus"
    for i in range(4):
        (corpus / f"doc{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (corpus / f"doc{i}.txt").write_text(TEXT * (8 + i))
    args = ["--module", "dyt_llama.train", "--config", str(ROOT / "recipes" / "llama" / "tiny.yaml")]
    for item in [f"data.corpus={corpus}", "data.validation_works=[doc3]", "data.seq_len=16", "model.dim=32",
                 "model.layers=2", "model.heads=4", "model.kv_heads=2", "model.ffn_dim=64", "model.vocab_size=300",
                 "model.norm=dyt", "train.steps=4", "train.micro_batch_size=4", "train.warmup_steps=1",
                 "train.eval_every=2", "train.save_every=2", "train.log_every=1", "train.progress=false",
                 "train.tensorboard=false"]:
        args += ["--set", item]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cache = {"DYT_CACHE": str(tmp_path / "cache")}
    _launch([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), *args,
             "--set", f"train.out_dir={tmp_path / 'whole'}"], tmp_path, **cache)
    checkpoints = tmp_path / "whole" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    last = read_metrics(tmp_path / "whole" / "metrics.jsonl")[-1]
    assert last["eval/perplexity"] == pytest.approx(math.exp(last["eval/loss"]), rel=1e-5)
    assert {"alpha/blocks.0.attention_norm", "peak_rss_mb/rank0", "peak_rss_mb/rank1"} <= last.keys()
    # the run recorded the corpus files it read, as the resume check and the comparisons compare them
    from dyt.train.data_files import files_signature
    from dyt_llama.data import DataConfig

    record = json.loads((tmp_path / "whole" / "data_files.json").read_text())
    assert record == files_signature(DataConfig(corpus=str(corpus)).source_files()) and record["files"] == 4
    assert json.loads((checkpoints / "step_00000002" / "COMPLETE").read_text()) == {"step": 2, "world_size": 2}

    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")
    proc = _launch([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), *args,
                    "--set", f"train.out_dir={tmp_path / 'resumed'}", "--resume"], tmp_path, **cache)
    assert re.search(r"resumed from \S*step_00000002 \(step 2,", proc.stdout), proc.stdout[-2000:]
    rows = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    keys = ["train/loss", "eval/loss", "lr"] + [k for k in whole[-1] if k.startswith("alpha/")]
    assert len(keys) > 3 + 4  # a DyT per attention and FFN of each block, and the final one
    for before, after in zip(whole[2:], rows[2:]):  # steps 3 and 4: computed after the resume
        for key in keys:
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-5), (key, before["step"])
    assert rows[-1]["train/loss"] != whole[0]["train/loss"]  # it trained
    # the resumed launch logs as the first did, and its data record still names the files it read
    assert rows[-1]["eval/perplexity"] == pytest.approx(math.exp(rows[-1]["eval/loss"]), rel=1e-5)
    assert {"peak_rss_mb/rank0", "peak_rss_mb/rank1"} <= rows[-1].keys()
    assert json.loads((tmp_path / "resumed" / "data_files.json").read_text()) == record


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed's CPU communication op is built without CUDA only")
def test_a_lock_file_left_in_the_cpu_communication_ops_build_folder_does_not_hang_a_run():
    """torch takes a plain ``lock`` file in an extension's build folder on every load, even of a built
    one; a run killed while DeepSpeed loaded its CPU communication op (as it starts) left it, and every
    later CPU run waited on it forever without a word. The harness loads the op under the build
    folder's kernel lock, which removes such a leftover."""
    import time

    from dyt.kernels.cpp_build import CpuExtension, held_build_folder

    folder = CpuExtension.build_folder("deepspeed_shm_comm")  # ShareMemCommBuilder.NAME's build
    with held_build_folder(folder):  # no other test worker's run is loading it meanwhile
        (folder / "lock").touch()  # what torch's FileBaton leaves behind when its holder is killed, an hour ago
        os.utime(folder / "lock", (time.time() - 3600, time.time() - 3600))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_WAIT_POLICY": "PASSIVE"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    try:
        done = subprocess.run([sys.executable, "-c", "from dyt.train.distributed import init_distributed; "
                               "print(init_distributed().world_size)"], capture_output=True, text=True, env=env,
                              timeout=180)
    except subprocess.TimeoutExpired:
        with held_build_folder(folder):  # removes the file: the rest of the suite must not hang on it
            pass
        pytest.fail("the run waited on the leftover lock file")
    assert done.returncode == 0 and done.stdout.split()[-1] == "1", done.stderr
    with contextlib.suppress(FileNotFoundError):  # gone; or another test worker's run, loading the op, holds a new one
        assert (folder / "lock").stat().st_mtime > time.time() - 1800, "the leftover lock file is still there"


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed's CPU communication op is built without CUDA only")
def test_a_new_process_takes_the_built_cpu_communication_op_without_cpp_extension():
    """After one load has stamped DeepSpeed's CPU communication op, a new run imports its library
    itself (no ninja run, no setuptools or hipify import) and DeepSpeed's own load hands back that
    module; the process group then comes up on it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_WAIT_POLICY": "PASSIVE"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    stamp = ("from dyt.train.distributed import load_cpu_communication_op\n"
             "assert load_cpu_communication_op()")
    done = subprocess.run([sys.executable, "-c", stamp], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    code = ("import sys\nfrom deepspeed.accelerator import get_accelerator\n"
            "from dyt.train.distributed import init_distributed, load_cpu_communication_op\n"
            "assert load_cpu_communication_op()\n"
            "builder = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "assert builder.load() is builder._loaded_ops[builder.name] and hasattr(builder.load(), 'initialize')\n"
            "print(init_distributed().world_size, 'torch.utils.cpp_extension' in sys.modules)\n"
            "import torch\ntorch.distributed.destroy_process_group()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["1", "False"], done.stdout + done.stderr[-3000:]


def test_the_cpu_communication_ops_stamp_follows_its_sources_headers_and_torch(monkeypatch, tmp_path):
    """The op's folder is shared by every environment on the machine and carries no digest, so its
    stamp must change with any file its build reads (a header edited in a DeepSpeed checkout, which
    ninja's dependency files used to catch) and with the torch it is built against."""
    from deepspeed.accelerator import get_accelerator

    from dyt.train.distributed import _communication_op_made_of

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        pytest.skip("no CPU communication op for this accelerator")
    made_of = _communication_op_made_of(builder)
    sources = Path(builder.deepspeed_src_path(builder.sources()[0])).parent
    copy = tmp_path / "csrc"
    shutil.copytree(sources, copy)
    monkeypatch.setattr(builder, "deepspeed_src_path", lambda path: str(copy / Path(path).name))
    copied = _communication_op_made_of(builder)
    header = next(copy.rglob("*.h"))
    header.write_bytes(header.read_bytes() + b"\n")
    assert _communication_op_made_of(builder) != copied
    monkeypatch.undo()
    assert _communication_op_made_of(builder) == made_of
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert _communication_op_made_of(builder) != made_of


def test_a_run_folder_that_is_not_shared_by_every_rank_stops_at_start(tmp_path):
    """A ``train.out_dir`` on each node's own disk was accepted on a fresh start: rank 0 then marked
    checkpoints complete that held its node's shards alone, found out at the first ``--resume``. Two
    ranks given two folders (what one path on two nodes' own disks is) stop before training, with
    the rank that did not see rank 0's file named; given one folder, they go on."""
    script = ("import sys\nfrom pathlib import Path\nfrom dyt.errors import UserInputError, one_line\n"
              "from dyt.train.distributed import init_distributed\nfrom dyt.train.trainer import check_folder_shared\n"
              "dist = init_distributed()\nfolder = Path(sys.argv[1].replace('RANK', str(dist.rank)))\n"
              "folder.is_file() or folder.mkdir(parents=True, exist_ok=True)\n"
              "try:\n    check_folder_shared(folder, dist, wait_s=1.0)\nexcept UserInputError as error:\n"
              "    print(one_line('t', error))\nelse:\n    print('shared')\n"
              "import torch\ntorch.distributed.destroy_process_group()\n")  # else gloo may abort at exit
    port = free_port()

    def launch(folder: str) -> list[str]:
        procs = [subprocess.Popen([sys.executable, "-c", script, folder], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                                  "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
                 for rank in (0, 1)]
        outs = [proc.communicate(timeout=180) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
        return [out.strip().splitlines()[-1] for out, _ in outs]

    assert launch(str(tmp_path / "one")) == ["shared", "shared"]
    assert not any((tmp_path / "one").iterdir())  # the check's file is gone
    port = free_port()
    said = launch(str(tmp_path / "own-disk-RANK"))
    assert said == [
        f"t: config error: train.out_dir {tmp_path / f'own-disk-{rank}'} is not one folder for every rank: rank(s) 1 "
        "of 2 did not find in 1 s the file rank 0 wrote there; put it on a file system every node shares (a relative "
        "path is taken from each node's working directory), else rank 0 alone would hold complete checkpoints"
        for rank in (0, 1)], said
    port = free_port()
    (tmp_path / "a-file").write_text("not a folder")  # rank 0 cannot write in it: every rank says so at once
    assert launch(str(tmp_path / "a-file")) == [f"t: config error: cannot write in train.out_dir {tmp_path / 'a-file'}: "
                                                f"{why}" for why in ("Not a directory", "see rank 0")]


@pytest.mark.parametrize("value", ["abc", "2.0", "0", "-1", "1e3"])
def test_a_launcher_variable_that_is_no_count_is_a_one_line_error(value, monkeypatch, capsys):
    """``WORLD_SIZE=abc`` left in a shell was int()'s ValueError traceback from the set-up."""
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(LaunchEnvironmentError, match=rf"WORLD_SIZE='{re.escape(value)}' in the environment: a launcher "
                                                     r"\(deepspeed, torchrun\) sets it to a whole number of at least 1"):
        launcher_number("WORLD_SIZE", default=1, least=1)
    with pytest.raises(SystemExit) as stopped:
        run_recipe(ToyConfig, ToyTask, ["--set", "train.steps=1"])
    assert stopped.value.code == 2 and "launch error: WORLD_SIZE=" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_SIZE", " 4 ")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    assert launcher_number("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=1, least=1) == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert launcher_number("WORLD_SIZE", default=1, least=1) == 1 and launcher_number("LOCAL_RANK", default=0, least=0) == 0


@pytest.mark.parametrize("ends_process, outcome, leaves", [
    (True, "finished", True),
    (True, "together", True),  # e.g. a failed save: every rank raises it at once, after agreeing on it
    (True, "together, the teardown failing", True),  # still the error's one line
    (True, "one rank", False),  # another rank may wait in a collective: destroying the group could hang
    (True, "together, a bug", True),  # its traceback, exit 1: the other ranks stopped with it (a failed forward)
    (False, "finished", False),  # in-process callers (tests, notebooks) train again in the same process
])
def test_a_process_main_leaves_its_process_group_where_every_rank_ends_together(tmp_path, monkeypatch, capsys,
                                                                                 ends_process, outcome, leaves):
    """A recipe's main destroys its process group before the interpreter exits, as gloo needs (see the
    next test), and ends its process without the teardown, with the status of how it ended; only where
    no other rank can still be in a collective (``raised_together``). The error's line comes once."""
    import dyt.train.cli as cli

    left = []

    class Trained:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self, resume):
            if outcome == "finished":
                return "result"
            error = RuntimeError("a bug") if outcome.endswith("bug") else UserInputError("a write failed")
            error.raised_together = outcome.startswith("together")
            raise error

    def leave():
        left.append(True)
        if outcome.endswith("failing"):
            raise RuntimeError("the teardown failed")

    monkeypatch.setattr(cli, "Trainer", Trained)
    monkeypatch.setattr(cli, "leave_process_group", leave)
    monkeypatch.setattr(cli, "end_process", lambda status=0: left.append(("ended", status)))
    argv = ["--set", f"train.out_dir={tmp_path / 'run'}", "--set", "train.steps=1"]
    if outcome == "finished":
        assert run_recipe(ToyConfig, ToyTask, argv, ends_process=ends_process) == "result"
    elif outcome.endswith("bug"):
        with pytest.raises(RuntimeError):  # the stub of end_process returns
            run_recipe(ToyConfig, ToyTask, argv, ends_process=ends_process)
        assert "RuntimeError: a bug" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as stopped:
            run_recipe(ToyConfig, ToyTask, argv, ends_process=ends_process)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.count("error: a write failed") == 1
    status = 0 if outcome == "finished" else 1 if outcome.endswith("bug") else 2
    assert left == ([True, ("ended", status)] if leaves else [])


@pytest.mark.distributed
def test_gloo_aborts_at_exit_now_and_then_unless_the_process_group_is_destroyed(tmp_path):
    """Why :func:`leave_process_group` exists, on plain torch: two gloo ranks whose last collective is
    an ``all_gather_object`` and that exit without destroying their group abort at exit now and then
    ("terminate called without an active exception", exit -6: 8 launches in 40 on the dev box, and 3
    2-rank tests in 6 CI runs once the checkpoint save gathered objects). The same launches destroying
    it through ``leave_process_group`` never do (0 in 40). Each rank checks that the group is gone."""
    code = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from dyt.train.distributed import leave_process_group
        dist.init_process_group("gloo")
        objects = [None] * dist.get_world_size()
        dist.all_gather_object(objects, {"rank": dist.get_rank()})
        leave_process_group()
        assert not dist.is_initialized()
    """)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    for launch in range(3):
        env["MASTER_PORT"] = str(free_port())
        ranks = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(2)]
        try:
            for rank in ranks:
                output = rank.communicate(timeout=120)[0]
                assert rank.returncode == 0, f"launch {launch}: exit {rank.returncode}: {output[-2000:]}"
        finally:
            for rank in ranks:
                rank.kill()


@pytest.mark.parametrize("module", ["dyt_llama.train", "dyt_wav2vec2.train", "dyt_dna.train"])
def test_each_recipe_main_says_its_process_ends(monkeypatch, module):
    """``deepspeed --module dyt_*.train`` runs these mains: each must let the harness leave the
    process group (``ends_process``)."""
    import importlib

    recipe = importlib.import_module(module)
    calls = []
    monkeypatch.setattr(recipe, "run_recipe", lambda *args, **kwargs: calls.append(kwargs))
    recipe.main()
    assert calls and calls[0].get("ends_process") is True
