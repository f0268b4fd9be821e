"""Pretraining at scale in the shared harness (issue #13): partitioned ZeRO-3 init, resume on
another world size through DeepSpeed's universal checkpoint, the engine's dtype for inputs, and what
``--resume`` accepts changed in a run's config. The one-line errors (a config change a checkpoint
cannot take, a DeepSpeed JSON that contradicts ``train.*``) are cases of tests/test_bad_input.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyt.train import DistInfo, TrainConfig, Trainer, load_config, read_metrics, run_recipe
from dyt.train.distributed import free_port, normal_chunks
from dyt.train.trainer import engine_input_dtype, seed_everything

HERE = Path(__file__).parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))
from toy_recipe import ToyConfig, ToyTask  # noqa: E402


def _launch(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(HERE), **(extra_env or {})}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _ranks(ranks: int, launcher: str = "torchrun") -> list[str]:
    """``launcher`` for ``ranks`` local ranks, torchrun unless named: what these tests check does not
    depend on the launcher, and torchrun starts its ranks ~5 s sooner on the 2-core box than the
    deepspeed launcher, whose runner and per-node launcher each import DeepSpeed first (one ZeRO-3
    case below keeps it, as do tests/test_harness.py, test_distributed.py, test_wav2vec2.py and
    test_dna.py)."""
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(free_port())]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ---------------------------------------------------------------- partitioned init under ZeRO-3

SMALL_LLAMA = ["model.dim=64", "model.layers=2", "model.heads=4", "model.kv_heads=2", "model.ffn_dim=128",
               "model.vocab_size=300", "model.norm=dyt"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_partitioned_init_gives_the_weights_of_a_whole_build(tmp_path, precision):
    """2 ranks build a small LLaMA (DyT, so embed_scale and alphas too) under ZeRO-3 through the
    harness: the model must come back from ``build_model`` already sharded (deepspeed.zero.Init, so
    no rank held it whole), and the weights gathered from the shards must equal, bit for bit, a
    single process's plain build with the same seed (cast to bf16 for a bf16 run, as the
    whole-model path casts). ``Llama.reset_parameters`` writes its children's weights after they
    are sharded: without ``init_normal_`` writing the shards 16 of the 27 tensors differ (checked by
    hand). Its chunk is cut to 112 elements here, so that the 9600-element shards of the embedding
    take ~86 chunks, one of them across the two ranks' boundary."""
    from dyt_llama.model import Llama
    from dyt_llama.task import LlamaConfig

    items = SMALL_LLAMA + ["train.zero_stage=3", f"train.precision={precision}", f"train.out_dir={tmp_path / 'z3'}"]
    _launch([*_ranks(2), str(HERE / "zero_init_probe.py"), "--config", str(ROOT / "recipes/llama/tiny.yaml"),
             *_sets(items)], tmp_path, extra_env={"DYT_TEST_NORMAL_CHUNK": "112"})
    # torch's F.linear still: DeepSpeed's memory-efficient one stays for the rest of the process once set
    assert json.loads((tmp_path / "z3/initial.json").read_text()) == {"built_sharded": True, "world_size": 2,
                                                                       "torch_linear": True}
    gathered = torch.load(tmp_path / "z3/initial.pt")

    config = load_config(LlamaConfig, ROOT / "recipes/llama/tiny.yaml", SMALL_LLAMA)
    seed_everything(config.train.seed)
    whole = {name: p.detach() for name, p in Llama(config.model).named_parameters()}
    assert sorted(gathered) == sorted(whole) and len(whole) == 27
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, weight in whole.items():
        assert gathered[name].dtype == dtype, name
        assert torch.equal(gathered[name], weight.to(dtype)), name


@pytest.mark.parametrize("numel", [1, 15, 16, 17, 40, 111, 112, 127, 128, 129, 1000, 4096 + 7])
def test_normal_chunks_draw_the_values_of_one_normal_over_the_whole(numel):
    """``init_normal_`` fills a sharded parameter chunk by chunk: drawn one after another, the chunks
    must hold what one ``normal_`` over the whole tensor holds, bit for bit, for sizes that are and
    are not multiples of 16 and a last piece shorter than 16 (which must join the previous chunk)."""
    torch.manual_seed(0)
    whole = torch.empty(numel).normal_(0.5, 2.0)
    for chunk in (16, 32, 112):
        pieces = list(normal_chunks(numel, chunk))
        assert pieces[0][0] == 0 and sum(size for _, size in pieces) == numel
        assert all(size >= min(16, numel) for _, size in pieces)
        torch.manual_seed(0)
        chunked = torch.empty(numel)
        for start, size in pieces:
            chunked[start:start + size].normal_(0.5, 2.0)
        assert torch.equal(chunked, whole), (numel, chunk)
    with pytest.raises(ValueError, match="multiple of 16"):
        list(normal_chunks(100, 24))


def test_partitioned_init_is_declared_by_the_task():
    """The harness builds shard by shard only for a task that says its model can be (the LLaMA task,
    bar the norm-free baselines whose set-up rewrites built weights); a task that does not (the toy)
    is built whole, as before."""
    from dyt_llama.task import LlamaConfig, LlamaTask

    def task(kind: str) -> LlamaTask:
        instance = LlamaTask.__new__(LlamaTask)
        instance.config = load_config(LlamaConfig, None, [f"model.norm={kind}"])
        return instance

    assert task("dyt").partitioned_init and task("rmsnorm").partitioned_init
    assert not task("fixup").partitioned_init and not task("sigma-reparam").partitioned_init
    assert not getattr(ToyTask(ToyConfig()), "partitioned_init", False)


def test_a_whole_build_too_large_for_the_node_is_refused_before_it_starts(monkeypatch):
    """A task that cannot be built shard by shard (the fixup and sigma-reparam baselines) is built
    whole in fp32 on every rank before ZeRO-3 shards it: a 70B one took 276 GB a rank and ran the node
    out of memory without a word. Its parameters are counted on the meta device first (sigmaReparam's
    SVD included: torch runs it there), with no random draw, and a build that would not fit is a
    config error."""
    from dyt.train.config import ConfigError
    from dyt.train.trainer import whole_build_problem
    from dyt_llama.model import Llama
    from dyt_llama.task import LlamaConfig

    config = load_config(LlamaConfig, ROOT / "recipes/llama/70b.yaml", ["model.norm.kind=sigma-reparam"],
                         check_files=False)
    torch.manual_seed(0)
    first_draw = torch.rand(1).item()
    torch.manual_seed(0)
    said = whole_build_problem(lambda: Llama(config.model), 8, 1000 * 2**30)
    assert torch.rand(1).item() == first_draw  # counting drew nothing from the generator the build then seeds
    assert said == ("under ZeRO-3 this model (68.98B parameters) is built whole in fp32 on every rank before DeepSpeed "
                    "shards it (it cannot be built shard by shard: e.g. the fixup and sigma-reparam baselines rewrite "
                    "the built model), 2055.6 GiB for the 8 rank(s) on this node, and 1000.0 GiB is available: train a "
                    "smaller model or fewer ranks a node")
    assert whole_build_problem(lambda: Llama(config.model), 8, 3000 * 2**30) is None
    assert whole_build_problem(lambda: Llama(config.model), 8, None) is None  # memory unknown: not told
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.task = TrainConfig(zero_stage=3), ToyTask(ToyConfig())
    trainer.dist = DistInfo(0, 1, 0, torch.device("cpu"), local_world_size=1)
    monkeypatch.setattr("dyt.train.trainer.available_host_memory", lambda: 100)  # the toy: 130 parameters, 520 bytes
    reduced = []  # a world of one: every rank decides on the lowest measure, which all_reduce hands round
    monkeypatch.setattr("dyt.train.trainer.barrier", lambda: None)
    monkeypatch.setattr("dyt.train.trainer.all_reduce", lambda value, op: reduced.append(op) or value)
    with pytest.raises(ConfigError, match=r"built whole in fp32 on every rank .* 0.0 GiB is available"):
        trainer.build_model()  # the toy task, not partitioned, at ZeRO-3
    assert reduced == ["min"]


# ---------------------------------------------------------------- resume on another world size

TOY = ["train.steps=6", "train.save_every=3", "train.micro_batch_size=8", "train.lr=0.01", "train.warmup_steps=2",
       "train.eval_every=3", "train.eval_batches=3", "train.progress=false",
       "train.tensorboard=false", "model.dropout=0.0", "data.examples=64", "data.eval_noise=0.5"]
"""Validation: 3 batches of 8 with random draws (``data.eval_noise``), so on 2 ranks rank 1 runs one
forward it does not count (a ZeRO-3 forward is collective), and a resume on another world size must
score the same examples with the same draws."""


def _toy(ranks: int, items: list[str], cwd: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """The toy recipe on ``ranks`` ranks (``launcher``; plain python for one), ``items`` as
    ``--set`` overrides after TOY's, ``--resume`` passed through."""
    script = str(HERE / "toy_recipe.py")
    cmd = [*_ranks(ranks, launcher), script] if ranks > 1 else [sys.executable, script]
    flags = [item for item in items if item.startswith("--")]
    return _launch(cmd + _sets(TOY + [item for item in items if not item.startswith("--")]) + flags, cwd)


def _resume_from_step_3(ranks: int, items: list[str], cwd: Path, whole: str = "whole",
                        resumed: str = "resumed") -> subprocess.CompletedProcess:
    """A copy of the 6-step toy run ``whole`` cut back to its step-3 checkpoint, resumed as ``resumed``
    on ``ranks`` ranks with ``items``."""
    shutil.copytree(cwd / whole, cwd / resumed)
    shutil.rmtree(cwd / resumed / "checkpoints/step_00000006")
    return _toy(ranks, [*items, f"train.out_dir={resumed}", "--resume"], cwd)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage, saved_ranks, resumed_ranks, global_batch",
                         [(2, 2, 1, False), (2, 1, 2, False), (3, 2, 1, False), (3, 1, 2, False), (0, 2, 1, True)],
                         ids=["zero2-2-to-1", "zero2-1-to-2", "zero3-2-to-1", "zero3-1-to-2", "zero0-2-to-1-global-batch"])
def test_resume_on_another_world_size_continues_the_uninterrupted_run(tmp_path, stage, saved_ranks, resumed_ranks,
                                                                      global_batch):
    """A toy run of 6 steps on ``saved_ranks`` checkpoints at steps 3 and 6. A copy cut back to step
    3 resumes on ``resumed_ranks`` with grad_accum set so that the global batch stays 16 examples
    (2 ranks x 8, or 1 rank x 8 x 2 micro-batches). DeepSpeed refuses a ZeRO-2 checkpoint on another
    world size ("The checkpoint being loaded used a DP world size of 2 but the current world size
    is 1"); the harness converts it to a universal checkpoint and loads that. A ZeRO-0 checkpoint
    holds whole states and loads as is. Under ZeRO-3 DeepSpeed's universal load hands both parameter
    groups one shared Adam ``step`` tensor, which AdamW then advanced twice per step (alpha at step 4
    was 0.48921 against 0.48940); the harness gives each its own (``_repair_optimizer_after_load``).
    With ``global_batch``, both launches say ``train.global_batch_size=16`` instead, and each derives
    its grad_accum: the same settings resume on a lost rank with no change to make.

    What must continue: the step (metrics rows 4-6 follow 1-3), the LR schedule (same lr per step),
    the data position (same examples per step: the losses would differ at step 4 otherwise, e.g.
    with the position reset to 0 or kept per rank), weights and Adam moments (steps 4-6 losses,
    validation loss and DyT alpha). 64 examples = 4 global batches, so the 6 steps cross an epoch
    boundary. Tolerance rel 1e-5: the gradient is averaged over ranks on one side and over
    micro-batches on the other (tests/test_distributed.py compares the two set-ups alike); the
    fp32 weights and moments come through the universal checkpoint exactly.

    DeepSpeed's ZeRO-3 universal load also copies the first parameter group's settings into every
    group, so the never-decayed group (norm weights, DyT's alpha, biases) was decayed from the
    resume on, and every later checkpoint saved it so. The harness puts the groups back: the resumed
    run's own checkpoint holds the groups the run was built with."""
    accum = {1: 2, 2: 1}
    batch = {n: ["train.global_batch_size=16"] if global_batch else [f"train.grad_accum={accum[n]}"] for n in accum}
    extra = []
    if stage == 3:  # every parameter partitioned, DyT's alpha too (logged gathered: it was NaN)
        # ... and gathered again for every forward (nothing kept live between them), so that a
        # validation forward on one rank alone would wait for the others
        (tmp_path / "partition_all.json").write_text(
            '{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, '
            '"stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}')
        extra = ["train.deepspeed_config=partition_all.json"]
    launcher = "deepspeed" if (stage, saved_ranks) == (3, 2) else "torchrun"  # one ZeRO-3 launch as users launch
    saved = _toy(saved_ranks, [f"train.zero_stage={stage}", *batch[saved_ranks], "train.out_dir=whole", *extra],
                 tmp_path, launcher)
    checkpoints = tmp_path / "whole/checkpoints"
    assert json.loads((checkpoints / "step_00000003/COMPLETE").read_text()) == {"step": 3, "world_size": saved_ranks}

    resume = _resume_from_step_3(resumed_ranks, [f"train.zero_stage={stage}", *batch[resumed_ranks], *extra], tmp_path)
    out = resume.stdout
    universal = (tmp_path / "resumed/checkpoints/step_00000003/universal/COMPLETE").is_file()
    if stage:
        assert f"saved by {saved_ranks} rank(s), now {resumed_ranks}: loaded through DeepSpeed's universal checkpoint" in out
        assert universal
    else:
        assert f"saved by {saved_ranks} rank(s), now {resumed_ranks})" in out and not universal
    assert "(step 3, data epoch 0 example 48;" in out  # 3 steps x 16 examples
    if global_batch:
        for proc, ranks in ((saved, saved_ranks), (resume, resumed_ranks)):
            assert (f"global batch 16 examples per step: micro-batch 8 x {ranks} rank(s) x grad_accum {accum[ranks]}"
                    in proc.stdout)
        assert "train.grad_accum" not in out and "warning: global batch" not in out  # nothing to change by hand
    else:
        assert f"train.grad_accum {accum[saved_ranks]} -> {accum[resumed_ranks]}" in out

    whole = read_metrics(tmp_path / "whole/metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed/metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(whole[3:], resumed[3:]):  # steps 4-6: computed after the resume
        assert after["lr"] == pytest.approx(before["lr"], rel=1e-12), before["step"]
        for key in ("train/loss", "eval/loss", "alpha/1"):
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-5), (key, before["step"], before[key], after[key])
    assert "eval/loss" in resumed[-1]
    assert abs(resumed[-1]["alpha/1"] - resumed[2]["alpha/1"]) > 1e-4  # it trained after the resume

    # The resumed run's own checkpoint is written by the new world size and resumes there as usual.
    assert json.loads((tmp_path / "resumed/checkpoints/step_00000006/COMPLETE").read_text()) == {
        "step": 6, "world_size": resumed_ranks}

    def weight_decays(run: str) -> list[float]:
        states = torch.load(next((tmp_path / run / "checkpoints/step_00000006").glob("*optim_states.pt")),
                            weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
        return [group["weight_decay"] for group in states["param_groups"]]

    if stage == 3:
        assert weight_decays("whole") == [0.1, 0.0]
        assert weight_decays("resumed") == [0.1, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_a_model_of_matrices_only_resumes(tmp_path, stage):
    """With no norm and no bias (LLaMA's ``norm.kind=identity``) the never-decayed parameter group is
    empty and DeepSpeed drops it in place; the harness took the group count from before
    ``deepspeed.initialize`` (2) and refused every resume of such a run ("2 parameter groups when
    built"). The resumed steps follow the uninterrupted run."""
    items = [f"train.zero_stage={stage}", "model.norm.kind=identity", "model.bias=false", "train.grad_accum=2"]
    _toy(1, [*items, "train.out_dir=whole"], tmp_path)
    _resume_from_step_3(1, items, tmp_path)
    whole, resumed = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("whole", "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(whole[3:], resumed[3:]):
        assert after["train/loss"] == pytest.approx(before["train/loss"], rel=1e-6), before["step"]


@pytest.mark.slow
def test_bf16_zero0_takes_no_adam_step_before_training(tmp_path):
    """DeepSpeed's ZeRO-0 half-precision optimizer (``FP16_UnfusedOptimizer``) steps the torch AdamW
    once with zero gradients when built, so Adam's step ran one ahead of the run (4 at step 3) and the
    first update was ~26% smaller than under ZeRO-1/2/3. The harness sets it back: the checkpoint of
    step 3 holds Adam step 3, and the run logs the alphas of the same run under ZeRO-2."""
    alphas = {}
    for stage in (0, 2):
        _toy(1, [f"train.zero_stage={stage}", "train.precision=bf16", "train.grad_accum=2",
                 f"train.out_dir=z{stage}"], tmp_path)
        alphas[stage] = [row["alpha/1"] for row in read_metrics(tmp_path / f"z{stage}/metrics.jsonl")]
    saved = torch.load(tmp_path / "z0/checkpoints/step_00000003/mp_rank_00_model_states.pt", weights_only=False)
    states = saved["optimizer"]["optimizer_state_dict"]["state"]
    assert {state["step"].item() for state in states.values()} == {3.0}
    # the logged alphas are the fp32 masters; the stages sum the 2 micro-batches in bf16 / fp32 (2e-5 apart)
    assert alphas[0] == pytest.approx(alphas[2], abs=5e-5, rel=0)
    # evals read the fp32 master weights at every stage (ZeRO-0 saved them unnamed: the copies were read)
    from dyt.train.checkpoint import trained_weights

    masters = {stage: trained_weights(tmp_path / f"z{stage}") for stage in (0, 2)}
    assert masters[0].keys() == masters[2].keys()
    for name, weight in masters[0].items():
        assert weight.dtype == torch.float32, name
        # the two stages sum the 2 micro-batches in bf16 / fp32: masters 3e-5 apart, bf16 copies up to 4e-3
        assert (weight - masters[2][name]).abs().max() < 1e-4, name
    for stage in (0, 2):  # the last logged alpha is the master the checkpoint holds, not its bf16 copy
        assert alphas[stage][-1] == masters[stage]["1.alpha"].item()


def test_a_shared_parameters_fp32_master_reaches_every_name_it_has(tmp_path):
    """Caduceus' two Mamba directions share projections: the state dict holds the parameter under two
    names and ``named_parameters`` under one. ZeRO-0's masters are recorded under every name, so the
    eval model loads the fp32 master whichever name ``load_state_dict`` writes last."""
    import json

    from dyt.train.checkpoint import MARKER, MASTER_NAMES, trained_weights

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.forward_dir = torch.nn.Linear(3, 3, bias=False)
            self.backward_dir = torch.nn.Module()
            self.backward_dir.proj = self.forward_dir

    model = Shared().bfloat16()
    master = torch.randn(3, 3)
    folder = tmp_path / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    from types import SimpleNamespace

    from dyt.train.trainer import _master_weight_names

    engine = SimpleNamespace(module=model, optimizer=SimpleNamespace(fp16_groups=[[model.forward_dir.weight]],
                                                                      fp32_groups=[[master]]))
    names = _master_weight_names(engine)
    assert names == [[["forward_dir.weight", "backward_dir.proj.weight"]]]
    torch.save({"module": model.state_dict(), "optimizer": {"fp32_groups": [[master]]}, MASTER_NAMES: names},
               folder / "mp_rank_00_model_states.pt")
    (folder / MARKER).write_text(json.dumps({"step": 1, "world_size": 1}))
    weights = trained_weights(tmp_path)
    fresh = Shared()
    fresh.load_state_dict(weights)
    assert torch.equal(fresh.forward_dir.weight.detach(), master)


@pytest.mark.slow
def test_a_grad_clip_changed_on_resume_applies_under_zero2(tmp_path):
    """``train.grad_clip`` may change on ``--resume``. DeepSpeed's ZeRO-1/2 load puts the saved clip
    back over the engine's, so a ZeRO-2 run kept clipping at 1.0 (its steps 4-6 equalled the
    unchanged run's). With the harness setting the run's own again, the ZeRO-2 resume at clip 0.01
    follows the ZeRO-0 one, which DeepSpeed never overrode."""
    alphas = {}
    for stage in (0, 2):
        items = [f"train.zero_stage={stage}", "train.grad_accum=2"]
        _toy(1, [*items, f"train.out_dir=z{stage}"], tmp_path)
        _resume_from_step_3(1, [*items, "train.grad_clip=0.01"], tmp_path, whole=f"z{stage}", resumed=f"r{stage}")
        alphas[stage] = [row["alpha/1"] for row in read_metrics(tmp_path / f"r{stage}/metrics.jsonl")]
    unchanged = [row["alpha/1"] for row in read_metrics(tmp_path / "z2/metrics.jsonl")]
    assert abs(alphas[0][3] - unchanged[3]) > 1e-4  # the smaller clip bites at step 4
    assert alphas[2] == pytest.approx(alphas[0], rel=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_another_world_size_restores_the_buffers(tmp_path):
    """DeepSpeed's universal load restores parameters and optimizer states, not the module's buffers:
    sigmaReparam's power-iteration vector ``u`` restarted from the initial weights' SVD (losses after
    the resume off by ~1.6e-5 relative here). The harness loads them from the checkpoint's model
    states. One rank resumes with micro-batch 16, so that, like the 2 x 8 ranks before, each step
    runs one forward (``u`` moves once per training forward). Validation takes the whole set, without
    draws, either way: its batches are micro-batches, so another micro-batch size batches it otherwise."""
    items = ["train.zero_stage=2", "model.norm.kind=sigma-reparam", "train.eval_batches=8", "data.eval_noise=0.0"]
    _toy(2, [*items, "train.out_dir=whole"], tmp_path)
    out = _resume_from_step_3(1, [*items, "train.micro_batch_size=16"], tmp_path).stdout
    assert "loaded through DeepSpeed's universal checkpoint" in out
    whole, resumed = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("whole", "resumed"))
    for before, after in zip(whole[3:], resumed[3:]):
        for key in ("train/loss", "eval/loss"):
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-6), (key, before["step"])


# ---------------------------------------------------------------- the engine's dtype for inputs

def test_inputs_follow_the_engines_dtype(tmp_path):
    """The cast of floating inputs reads the engine's weights' dtype, not train.precision. (A
    DeepSpeed JSON can no longer make the two differ, tests/test_config.py; this builds the engine
    from such a JSON directly, past the config check, to see which one the cast follows.)"""
    bf16_json = tmp_path / "bf16.json"
    bf16_json.write_text(json.dumps({"bf16": {"enabled": True}}))
    engines = {}
    for name, cfg in {"fp32": TrainConfig(out_dir=str(tmp_path / "a")),
                      "bf16-by-json": TrainConfig(out_dir=str(tmp_path / "b"), deepspeed_config=str(bf16_json))}.items():
        engines[name] = Trainer(ToyTask(ToyConfig(train=cfg)), cfg).build_engine()
    assert engine_input_dtype(engines["fp32"]) is None
    assert engine_input_dtype(engines["bf16-by-json"]) == torch.bfloat16
    assert next(engines["bf16-by-json"].module.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_sums_micro_batch_gradients_in_fp32_where_deepspeed_can(tmp_path, stage, capsys):
    """DeepSpeed sums the micro-batches' gradients in the model's dtype unless told otherwise: in bf16
    over 256 micro-batches (the 7b-70b configs on one GPU) 1.9e-2 relative error. ZeRO-2/3 sum in
    fp32; ZeRO-0/1 cannot (DeepSpeed refuses it, or swaps the optimizer), and a launch says so."""
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), precision="bf16", zero_stage=stage, grad_accum=4)
    engine = Trainer(ToyTask(ToyConfig(train=cfg)), cfg).build_engine()
    model_dtype, summed_in = engine.get_data_types()
    assert model_dtype == torch.bfloat16
    assert summed_in == (torch.float32 if stage >= 2 else torch.bfloat16)
    said = cfg.bf16_gradient_sum_warning()
    assert (said is None) == (stage >= 2)
    if said:
        assert f"train.zero_stage={stage}: DeepSpeed sums the 4 micro-batches' gradients of each step in bf16" in said
    assert dataclasses.replace(cfg, grad_accum=1).bf16_gradient_sum_warning() is None


# ---------------------------------------------------------------- what --resume accepts changed

def test_resume_prints_the_settings_that_changed_and_continues(tmp_path, capsys):
    """Steps, cadences, progress and the batch split may change on --resume: they are printed and
    the run continues (its config.yaml then records the new values)."""
    common = [f"train.out_dir={tmp_path / 'run'}", "train.save_every=2", "train.eval_every=0", "train.progress=false",
              "train.tensorboard=false", "model.width=8"]
    run_recipe(ToyConfig, ToyTask, _sets(common + ["train.steps=2"]))
    capsys.readouterr()
    result = run_recipe(ToyConfig, ToyTask, _sets(common + ["train.steps=4", "train.eval_every=2", "train.log_every=2"])
                        + ["--resume"])
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if line.startswith("--resume: changed")]
    assert changed == ["--resume: changed since the run's config.yaml: train.steps 2 -> 4; train.log_every 1 -> 2; "
                       "train.eval_every 0 -> 2"], out
    assert "resumed from" in out and "(step 2," in out and result.step == 4
    saved = load_config(ToyConfig, tmp_path / "run/config.yaml", check_files=False)
    assert saved.train.steps == 4 and saved.train.eval_every == 2


def test_resume_changes_split_model_keys_from_allowed_ones():
    from dyt.train.config import resume_changes

    saved = load_config(ToyConfig, None, ["model.norm=dyt"])
    fixed, allowed, results = resume_changes(saved, load_config(ToyConfig, None, [
        "model.norm=rmsnorm", "model.width=32", "train.steps=500", "train.lr=1e-4", "train.weight_decay=0.05",
        "train.grad_accum=4", "data.examples=128", "train.keep_checkpoints=7"]))
    assert fixed == ['model.width 16 -> 32', 'model.norm.kind "dyt" -> "rmsnorm"', "data.examples 256 -> 128",
                     "train.weight_decay 0.1 -> 0.05"]
    assert allowed == ["train.steps 100 -> 500", "train.grad_accum 1 -> 4", "train.lr 0.0003 -> 0.0001",
                       "train.keep_checkpoints 2 -> 7"]
    assert results == ["train.steps 100 -> 500", "train.grad_accum 1 -> 4", "train.lr 0.0003 -> 0.0001"]  # a cadence changes no number
    assert resume_changes(saved, saved) == ([], [], [])

    # validation batches by micro_batch_size where eval_micro_batch_size is null: a resume says both change
    micro = load_config(ToyConfig, None, ["train.micro_batch_size=8"])
    assert resume_changes(micro, load_config(ToyConfig, None, ["train.micro_batch_size=4"])).results == [
        "train.micro_batch_size 8 -> 4", "train.eval_micro_batch_size 8 -> 4"]
    assert resume_changes(micro, load_config(ToyConfig, None, ["train.micro_batch_size=4",
                                                               "train.eval_micro_batch_size=8"])).results == [
        "train.micro_batch_size 8 -> 4"]  # validation as before

    # the recipes' data settings that leave the data as it is (LLaMA's token stream, DNA's windows)
    from dyt_dna.task import DnaConfig
    from dyt_llama.task import LlamaConfig

    text = load_config(LlamaConfig, None, [])
    assert resume_changes(text, load_config(LlamaConfig, None, ["data.num_proc=4", "data.shard_chars=1000",
                                                                "data.seq_len=64", "data.cache_dir=/tmp/c"])) == (
        ["data.seq_len 128 -> 64"],
        ['data.cache_dir "" -> "/tmp/c"', "data.num_proc 1 -> 4", "data.shard_chars 200000000 -> 1000"],
        ['data.cache_dir "" -> "/tmp/c"'])  # resumed, the tokenizer is checked; a comparison does not reuse it
    dna = load_config(DnaConfig, None, [])
    assert resume_changes(dna, load_config(DnaConfig, None, ["data.cache_dir=/tmp/elsewhere"])) == (
        [], ['data.cache_dir "" -> "/tmp/elsewhere"'], [])


def test_runs_saved_with_a_null_compare_by_the_model_they_built():
    """LLaMA runs trained before 2026-12-05 saved ``model.embedding_scale: null`` (the scalar for DyT
    only); the default is now true. A DyT run built what the default builds and resumes; an RMSNorm
    run did not, and the change is named by what it built."""
    from dyt.train.config import resume_changes
    from dyt_llama.task import LlamaConfig

    def saved(norm):
        return load_config(LlamaConfig, None, [f"model.norm={norm}", "model.embedding_scale=null"])

    assert resume_changes(saved("dyt"), load_config(LlamaConfig, None, ["model.norm=dyt"])).fixed == []
    assert resume_changes(saved("rmsnorm"), load_config(LlamaConfig, None, [])).fixed == [
        "model.embedding_scale false -> true"]
    assert resume_changes(saved("rmsnorm"), saved("rmsnorm")).fixed == []

    # DNA decides its defaults by the norm (the scalar: no-norm; the head: null, caduceus-tiny.yaml's
    # until 2026-12-06): a run saved with them equals one given the values they resolved to, and not
    # one given others
    from dyt_dna.task import DnaConfig

    caduceus = Path(__file__).resolve().parents[1] / "recipes" / "dna" / "caduceus-tiny.yaml"
    dyt = load_config(DnaConfig, caduceus, ["model.norm=dyt", "model.tied_embeddings=null"])
    assert (dyt.model.embedding_scale, dyt.model.tied_embeddings) == ("no-norm", None)
    resolved = load_config(DnaConfig, caduceus, ["model.norm=dyt", "model.embedding_scale=true",
                                                 "model.tied_embeddings=false"])
    assert resume_changes(dyt, resolved).fixed == [] and resume_changes(resolved, dyt).fixed == []
    assert resume_changes(dyt, load_config(DnaConfig, caduceus, ["model.norm=dyt", "model.tied_embeddings=true"])).fixed == [
        "model.tied_embeddings false -> true"]


@pytest.mark.parametrize("numel, world, rank, shard, held", [
    (5, 3, 0, [1.0, 2.0], [1.0, 2.0]), (5, 3, 2, [5.0, float("nan")], [5.0]),  # shards of 2, the last padded
    (3, 4, 3, [float("nan")], []),  # shards of 1: rank 3 holds padding only
])
def test_a_zero3_shard_is_checked_without_its_padding(monkeypatch, numel, world, rank, shard, held):
    """ZeRO-3 pads every shard to one size (ceil(numel / world)) and leaves the padding as allocated,
    so it may hold a NaN: the divergence check before each save read whole shards and stopped a
    healthy 2-rank ZeRO-3 run as diverged now and then ("the weights became NaN or infinite at step
    3"). Each rank checks its shard's own elements; a NaN among them still counts."""
    from types import SimpleNamespace

    import dyt.train.trainer as trainer

    param = torch.nn.Parameter(torch.empty(0))
    param.ds_tensor = torch.tensor(shard)
    param.ds_tensor.ds_numel, param.ds_numel, param.ds_process_group = -(-numel // world), numel, None
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(trainer, "any_rank", lambda flag: flag)  # this rank's verdict
    module = torch.nn.Module()
    module.weight = param
    engine = SimpleNamespace(module=module)
    assert trainer._held_values(param).tolist() == held
    assert trainer._weights_finite(engine)
    param.ds_tensor[0] = float("inf") if held else param.ds_tensor[0]
    assert trainer._weights_finite(engine) == (not held)
