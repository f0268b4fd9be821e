"""What every recipe's norm comparison shares: launching one training run per (norm, seed) under a
launcher, and the report pieces (mean ± std cells, loss-curve and alpha plots).

Each run is passed ``--resume``, so a killed comparison continues where it stopped."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..analysis import pyplot
from .metrics import read_metrics

LAUNCHERS = ("deepspeed", "torchrun", "python")
WALL_FILE = "wall_seconds.json"
"""A run's training wall time (seconds), summed over its launches: see run_training."""


@dataclass
class Run:
    """One finished training run of a comparison."""

    label: str
    seed: int
    dir: Path
    wall_s: float

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.dir / "metrics.jsonl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every ``dyt-*-compare`` shares: where runs go and how they are launched."""
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks per training run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the --out folder and everything in it first (refused where --out holds the "
                             "current directory)")


def parse_run_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.launcher == "python" and args.nproc != 1:
        parser.error("--launcher python runs one process: use --nproc 1")
    return args


def prepare_out(args: argparse.Namespace) -> None:
    """Create ``--out``; with ``--fresh`` delete it, and what earlier runs left there, first."""
    if args.fresh and args.out.exists():
        here = Path.cwd().resolve()
        if args.out.resolve() in (here, *here.parents):
            raise SystemExit(f"--fresh would delete {args.out}, which holds the current directory; "
                             "give --out a folder of its own")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)


def launch_command(module: str, launcher: str, nproc: int) -> list[str]:
    """The command that starts ``python -m module`` on ``nproc`` local ranks."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if launcher == "python" and nproc != 1:
        raise ValueError("the python launcher runs one process: use nproc 1")
    bindir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bindir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_free_port()),
                "--module", module]
    if launcher == "torchrun":
        return [str(bindir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
                "-m", module]
    return [sys.executable, "-m", module]


def launch_env(nproc: int) -> dict[str, str]:
    """This process's environment for a fresh world of ``nproc`` local ranks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        # Ranks sharing a few cores: spinning OpenMP workers of one rank starve the other (measured
        # on 2 cores, 2 ranks: DyT compiled 5349 tokens/s spinning, 7340 passive).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_training(
    module: str, config: Path, out: Path, overrides: Sequence[str], *,
    label: str, seed: int, launcher: str = "deepspeed", nproc: int = 2,
) -> Run:
    """Train ``module`` with ``config`` + ``overrides`` into ``out`` (resuming what is there).

    The run's wall time is the sum over the launches that trained steps, kept in ``out``, so a run
    that was already finished reports the time it took then, not that of the check."""
    cmd = launch_command(module, launcher, nproc) + ["--config", str(config), "--resume"]
    for item in [*overrides, f"train.seed={seed}", f"train.out_dir={out}"]:
        cmd += ["--set", item]
    print(f"\n== {label}, seed {seed}: {' '.join(cmd)}", flush=True)
    wall_file = out / WALL_FILE
    steps_before = _last_step(out)
    started = time.perf_counter()
    try:
        subprocess.run(cmd, env=launch_env(nproc), check=True)
    finally:
        wall = json.loads(wall_file.read_text())["seconds"] if wall_file.is_file() else 0.0
        if _last_step(out) > steps_before:
            wall += time.perf_counter() - started
            wall_file.write_text(json.dumps({"seconds": wall}))
    return Run(label, seed, out, wall)


def _last_step(out: Path) -> int:
    """The last step a run in ``out`` logged (0 for none)."""
    path = out / "metrics.jsonl"
    return max((row["step"] for row in read_metrics(path)), default=0) if path.is_file() else 0


def reuse_or_compute(path: Path, settings: dict, compute: Callable[[], object]):
    """The JSON result stored at ``path`` when it was made with the same ``settings``; otherwise
    ``compute()``, stored with them. Lets a killed comparison skip its finished evals."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved["results"]
    results = compute()
    path.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    return results


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def peak_rss_per_rank(row: dict) -> list[float]:
    """The ``peak_rss_mb/rank<i>`` values of a metrics row in rank order (rank 10 after rank 9)."""
    ranks = {int(k.removeprefix("peak_rss_mb/rank")): v for k, v in row.items() if k.startswith("peak_rss_mb/rank")}
    return [ranks[i] for i in sorted(ranks)]


def median_throughput(rows: list[dict]) -> float:
    speeds = [r["throughput"] for r in rows if "throughput" in r]
    return statistics.median(speeds[1:] or speeds)  # the first logged step includes warm-up


def plot_losses(runs: Sequence[Run], path: Path, ylabel: str) -> None:
    """Training loss (lines) and validation loss (dots) of every run on one chart."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rows = run.metrics
        label = f"{run.label} (seed {run.seed})"
        train = [r for r in rows if "train/loss" in r]
        line, = ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], label=f"{label} train", alpha=0.8)
        evals = [r for r in rows if "eval/loss" in r]
        ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o--", color=line.get_color(),
                label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alphas(run: Run, path: Path) -> bool:
    """DyT alpha of every layer over training; False when the run logged none."""
    rows = [r for r in run.metrics if any(k.startswith("alpha/") for k in r)]
    if not rows:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted(k for k in rows[-1] if k.startswith("alpha/"))
    for name in names:
        ax.plot([r["step"] for r in rows], [r[name] for r in rows], label=name.removeprefix("alpha/"))
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    if len(names) <= 24:
        ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"DyT alpha per layer ({run.label})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
