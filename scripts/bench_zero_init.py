"""Peak memory per rank of the harness's ZeRO-3 start-up: a whole-model build against the
partitioned one (``deepspeed.zero.Init``, issue #13).

    DS_ACCELERATOR=cpu .venv/bin/python scripts/bench_zero_init.py [--ranks 2] [--set model.dim=...]
    # the 1.26B config of docs/performance.md (its engine would not fit in 24 GB):
    ... scripts/bench_zero_init.py --model-only --set model.dim=2048 --set model.layers=24 --set model.ffn_dim=5632

Launches the deepspeed launcher twice on ``--ranks`` CPU ranks (gloo), once per mode, each building
the LLaMA engine exactly as training does (``Trainer.build_engine``, ZeRO-3, fp32, AdamW) from a
LLaMA config of about 302M parameters (dim 1024, 20 layers, 16 heads, 8 KV heads, FFN 2816,
vocabulary 32000); no data, no step. ``whole``: the model is built whole on every rank, then
DeepSpeed shards it (the harness's path for a task without ``partitioned_init``); ``partitioned``:
each module is sharded as soon as it is built. Each rank reports its peak RSS (``ru_maxrss``)
after imports and the process group (the baseline), after the model is built and after the engine
is set up (``--model-only``: no engine, for sizes whose engine would not fit here); the script
prints them and the ratios partitioned / whole (highest rank of each; total RSS and RSS above the
baseline), and writes them as JSON (``--json``). Target (issue #13): peak RSS per rank at init,
when the model is built, <= 0.6 x the whole build's; docs/performance.md has the figures, and why
the ZeRO-3 engine's own buffers, set up alike after either build, do not shrink with it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dyt.bench import count_arg
from dyt.errors import help_description

MODES = ("whole", "partitioned")
SIZE = ["model.dim=1024", "model.layers=20", "model.heads=16", "model.kv_heads=8", "model.ffn_dim=2816",
        "model.vocab_size=32000", "model.max_seq_len=1024", "data.seq_len=512"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KB


def worker(mode: str, out_dir: Path, overrides: list[str], model_only: bool) -> None:
    """One rank: build the engine (or, ``model_only``, the model) through the harness and write this
    rank's memory figures."""
    import torch

    from dyt.train import Trainer, load_config
    from dyt_llama.model import count_parameters
    from dyt_llama.task import LlamaConfig, LlamaTask

    class ModelOnlyTask(LlamaTask):
        """The LLaMA task without data; records the peak RSS right after the model is built."""

        partitioned_init = mode == "partitioned"

        def __init__(self, config: LlamaConfig):
            self.config, self.train_rows = config, []
            self.after_build_mb = 0.0
            self.parameters = 0

        def build_model(self):
            model = super().build_model()
            self.after_build_mb, self.parameters = _peak_mb(), count_parameters(model)
            return model

    config = load_config(LlamaConfig, None, [*SIZE, *overrides, "train.zero_stage=3", "train.precision=fp32",
                                             f"train.out_dir={out_dir}"])
    task = ModelOnlyTask(config)
    trainer = Trainer(task, config.train, config)  # joins the process group
    baseline = _peak_mb()
    started = time.perf_counter()
    model = trainer.build_model() if model_only else trainer.build_engine().module
    seconds = time.perf_counter() - started
    rank = torch.distributed.get_rank()
    sharded = all(hasattr(p, "ds_id") for p in model.parameters())
    (out_dir / f"{mode}-rank{rank}.json").write_text(json.dumps({
        "mode": mode, "rank": rank, "world_size": torch.distributed.get_world_size(), "parameters": task.parameters,
        "baseline_mb": baseline, "after_build_mb": task.after_build_mb, "after_engine_mb": _peak_mb(),
        "seconds": seconds, "sharded": sharded,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=count_arg(1), default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="LLaMA config override, e.g. model.layers=24 (repeatable)")
    parser.add_argument("--model-only", action="store_true",
                        help="stop once the model is built (no engine): for configs whose ZeRO-3 engine "
                             "would not fit in this machine's memory")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.overrides, args.model_only)
        return

    from dyt.train.distributed import free_port

    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for mode in MODES:
            cmd = [deepspeed, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), __file__,
                   "--worker", mode, "--out", str(out), *(a for item in args.overrides for a in ("--set", item)),
                   *(["--model-only"] if args.model_only else [])]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} build failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            rows += [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(args.ranks)]

    by_mode = {mode: [r for r in rows if r["mode"] == mode] for mode in MODES}
    print(f"LLaMA {rows[0]['parameters'] / 1e6:.1f}M parameters (fp32 {rows[0]['parameters'] * 4 / 2**20:.0f} MiB), "
          f"ZeRO-3, {args.ranks} CPU ranks; peak RSS per rank, MiB (ru_maxrss)")
    print(f"{'mode':<12} {'rank':>4} {'baseline':>9} {'model built':>12} {'engine ready':>13} {'above baseline':>15} "
          f"{'seconds':>8} {'sharded':>8}")
    for r in rows:
        print(f"{r['mode']:<12} {r['rank']:>4} {r['baseline_mb']:>9.0f} {r['after_build_mb']:>12.0f} "
              f"{r['after_engine_mb']:>13.0f} {r['after_engine_mb'] - r['baseline_mb']:>15.0f} {r['seconds']:>8.1f} "
              f"{str(r['sharded']):>8}")

    def worst(mode: str, key: str, above: bool = False) -> float:
        return max(r[key] - (r["baseline_mb"] if above else 0.0) for r in by_mode[mode])

    ratios = {
        "peak_rss_model_built": worst("partitioned", "after_build_mb") / worst("whole", "after_build_mb"),
        "peak_rss_model_built_above_baseline": (worst("partitioned", "after_build_mb", True)
                                                / worst("whole", "after_build_mb", True)),
    }
    if not args.model_only:
        ratios["peak_rss_engine_ready"] = worst("partitioned", "after_engine_mb") / worst("whole", "after_engine_mb")
        ratios["peak_rss_engine_ready_above_baseline"] = (worst("partitioned", "after_engine_mb", True)
                                                          / worst("whole", "after_engine_mb", True))
    print("partitioned / whole, highest rank of each:")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    verdict = "met" if ratios["peak_rss_model_built"] <= 0.6 else "NOT met"
    print(f"target (issue #13): peak RSS per rank at init (model built) <= 0.6 x the whole build's: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "ranks": args.ranks}, indent=1))


if __name__ == "__main__":
    main()
