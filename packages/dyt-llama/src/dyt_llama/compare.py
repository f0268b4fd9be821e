"""Run the same LLaMA config with RMSNorm and with DyT (same seed, same data; optionally several
seeds) under a launcher, then write ``report.md`` with the paper-style table and PNG plots.

    dyt-llama-compare --config recipes/llama/tiny.yaml --out runs/llama-compare --nproc 2

Each run resumes if its directory already holds checkpoints, so a killed comparison continues.
"""

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
from pathlib import Path

import torch

from dyt.analysis import pyplot
from dyt.train import load_config, read_metrics

from .data import build_datasets, load_documents
from .task import LlamaConfig

NORMS = ("rmsnorm", "dyt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, nproc: int) -> list[str]:
    bindir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bindir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_free_port()),
                "--module", "dyt_llama.train"]
    if launcher == "torchrun":
        return [str(bindir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
                "-m", "dyt_llama.train"]
    return [sys.executable, "-m", "dyt_llama.train"]


def run_one(args, norm: str, seed: int) -> dict:
    out = args.out / f"{norm}-seed{seed}"
    cmd = launch_command(args.launcher, args.nproc) + ["--config", str(args.config), "--resume"]
    for item in [*args.overrides, f"model.norm.kind={norm}", f"train.seed={seed}", f"train.out_dir={out}"]:
        cmd += ["--set", item]
    # Each run is a world of its own: drop rank variables this process may carry.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        # Ranks sharing a few cores: spinning OpenMP workers of one rank starve the other (measured
        # on 2 cores, 2 ranks: DyT compiled 5349 tokens/s spinning, 7340 passive).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"\n== {norm}, seed {seed}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return {"norm": norm, "seed": seed, "dir": out, "wall_s": time.perf_counter() - started}


def summarize(run: dict) -> dict:
    rows = read_metrics(run["dir"] / "metrics.jsonl")
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    speeds = [r["throughput"] for r in rows if "throughput" in r]
    speeds = speeds[1:] or speeds  # the first logged step includes warm-up
    last = rows[-1]
    return {
        "final_train_loss": statistics.mean(train[-3:]),
        "eval_loss": evals[-1]["eval/loss"],
        "eval_perplexity": evals[-1]["eval/perplexity"],
        "tokens_per_s": statistics.median(speeds),
        "peak_rss_mb": [v for k, v in sorted(last.items()) if k.startswith("peak_rss_mb/")],
        "wall_s": run["wall_s"],
    }


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot_losses(runs: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rows = read_metrics(run["dir"] / "metrics.jsonl")
        label = f"{run['norm']} (seed {run['seed']})"
        line, = ax.plot([r["step"] for r in rows if "train/loss" in r], [r["train/loss"] for r in rows if "train/loss" in r],
                        label=f"{label} train", alpha=0.8)
        evals = [r for r in rows if "eval/loss" in r]
        ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o--", color=line.get_color(),
                label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alphas(run: dict, path: Path) -> bool:
    plt = pyplot()
    rows = [r for r in read_metrics(run["dir"] / "metrics.jsonl") if any(k.startswith("alpha/") for k in r)]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted(k for k in rows[-1] if k.startswith("alpha/")):
        ax.plot([r["step"] for r in rows], [r[name] for r in rows], label=name.removeprefix("alpha/"))
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("DyT alpha per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_rmsnorm_s_curves(run: dict, path: Path) -> None:
    """Load the RMSNorm model's last checkpoint and record its norms on one validation batch."""
    from dyt.analysis import NormRecorder, plot_s_curves

    from .model import Llama

    config = load_config(LlamaConfig, run["dir"] / "config.yaml")
    model = Llama(config.model).eval()
    last = sorted((run["dir"] / "checkpoints").glob("step_*"))[-1]
    model.load_state_dict(torch.load(last / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    _, validation, _ = build_datasets(config.data, config.model.vocab_size, config.model.max_seq_len)
    batch = torch.stack([validation[i] for i in range(min(4, len(validation)))])[:, :-1]
    with torch.no_grad(), NormRecorder(model, max_points=3000) as recorder:
        model(batch)
    plot_s_curves(recorder.records, path, title="RMSNorm model: norm input vs output (validation text)")


def write_report(args, runs: list[dict], held_out: list[str]) -> Path:
    out = args.out
    summaries = {id(r): summarize(r) for r in runs}
    lines = [
        "# LLaMA: RMSNorm vs DyT",
        "",
        f"Config `{args.config}` with {args.nproc} rank(s) under `{args.launcher}`; seeds "
        f"{sorted({r['seed'] for r in runs})}. Validation: whole documents held out of training: "
        f"{', '.join(held_out)}.",
        "",
        "| norm | final train loss | validation loss | validation perplexity | tokens/s | peak RSS per rank (MB) | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for norm in args.norms:
        mine = [summaries[id(r)] for r in runs if r["norm"] == norm]
        rss = " / ".join(f"{v:.0f}" for v in mine[0]["peak_rss_mb"])
        lines.append(
            f"| {norm} | {_mean_std([m['final_train_loss'] for m in mine])} | {_mean_std([m['eval_loss'] for m in mine])} "
            f"| {_mean_std([m['eval_perplexity'] for m in mine], 1)} | {_mean_std([m['tokens_per_s'] for m in mine], 0)} "
            f"| {rss} | {_mean_std([m['wall_s'] for m in mine], 0)} |"
        )
    plot_losses(runs, out / "loss_curves.png")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    dyt_runs = [r for r in runs if r["norm"] == "dyt"]
    if dyt_runs and plot_alphas(dyt_runs[0], out / "dyt_alpha.png"):
        lines += ["![DyT alpha per layer](dyt_alpha.png)", ""]
    rms_runs = [r for r in runs if r["norm"] == "rmsnorm"]
    if rms_runs:
        plot_rmsnorm_s_curves(rms_runs[0], out / "rmsnorm_s_curves.png")
        lines += ["![RMSNorm S-curves](rmsnorm_s_curves.png)", ""]
    (out / "summary.json").write_text(json.dumps(
        [{"norm": r["norm"], "seed": r["seed"], **summaries[id(r)]} for r in runs], indent=1))
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="dyt-llama-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("recipes/llama/tiny.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/llama-compare"))
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=["rmsnorm", "dyt", "layernorm", "identity"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--launcher", choices=["deepspeed", "torchrun", "python"], default="deepspeed")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true", help="delete earlier runs in --out first")
    args = parser.parse_args(argv)
    if args.launcher == "python" and args.nproc != 1:
        parser.error("--launcher python runs one process: use --nproc 1")

    config = load_config(LlamaConfig, args.config, args.overrides)  # config errors before any launch
    build_datasets(config.data, config.model.vocab_size, config.model.max_seq_len)  # and data errors; warms the cache
    held_out = list(load_documents(config.data)["validation"]["title"])
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run_one(args, norm, seed) for seed in args.seeds for norm in args.norms]
    report = write_report(args, runs, held_out)
    print(f"\nreport: {report}")
    return report


if __name__ == "__main__":
    main()
