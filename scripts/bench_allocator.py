"""Training step time and peak memory of a recipe on CPU under three glibc malloc settings, measured
in one run: glibc's defaults, the harness's default (``train.reuse_freed_memory``: freed blocks kept
for the next step, :mod:`dyt.allocator`) and glibc's huge pages.

    .venv/bin/python scripts/bench_allocator.py --module dyt_llama.train --config recipes/llama/tiny.yaml \\
        --set train.micro_batch_size=32 [--ranks 2] [--steps 12] [--rounds 3] [--json out.json]

glibc serves every block above its mmap threshold (128 KiB at start, raised as such blocks are
freed, to at most 32 MiB) with a fresh mmap and unmaps it on free, so a training step whose tensors
pass 32 MiB (logits, attention scores, wide conv features) faults in all their pages again each
step. Each round launches the recipe's training once per setting, in a new random order, through
the compare commands' launcher and environment (``dyt.train.compare.launch_command`` /
``launch_env``), and reads the run's metrics: the median seconds per step after ``--skip`` steps,
and the peak resident memory of its highest rank (``ru_maxrss``, which the harness logs at the
last step). It prints each run, then for every setting the median over rounds of its ratio to
glibc's defaults in the same round.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dyt.bench import count_arg
from dyt.errors import help_description

OFF = ["train.reuse_freed_memory=false"]
SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    # (environment, config overrides)
    "glibc defaults": ({}, OFF),
    # the harness's default: every freed block below 2 GiB stays in the heap (dyt.allocator)
    "freed blocks reused": ({}, ["train.reuse_freed_memory=true"]),
    # glibc asks for 2 MiB pages for its mmaps (the kernel's transparent huge pages in `madvise` mode)
    "huge pages": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, OFF),
}


def run_once(args: argparse.Namespace, setting: str, out: Path) -> dict[str, float]:
    """Train ``args.steps`` steps under ``setting``; its median step seconds and peak RSS (MiB)."""
    from dyt.bench import is_allocator_setting
    from dyt.train.compare import launch_command, launch_env
    from dyt.train.metrics import read_metrics

    # every allocator setting dyt-bench would record is dropped first, so each setting is what it says
    env = {k: v for k, v in launch_env(args.ranks).items() if not is_allocator_setting(k)}
    variables, overrides = SETTINGS[setting]
    env.update(variables)
    env.setdefault("TQDM_DISABLE", "1")
    launcher = "deepspeed" if args.ranks > 1 else "python"
    items = [*args.overrides, *overrides, f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0",
             "train.save_every=0", f"train.out_dir={out}"]
    cmd = [*launch_command(args.module, launcher, args.ranks), *(["--config", str(args.config)] if args.config else []),
           *(a for item in items for a in ("--set", item))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{setting} run failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    rows = read_metrics(out / "metrics.jsonl")
    seconds = [r["step_seconds"] for r in rows if "step_seconds" in r][args.skip:]
    if not seconds:
        sys.exit(f"no step after the first {args.skip}: raise --steps")
    peak = max(v for k, v in rows[-1].items() if k.startswith("peak_rss_mb/"))
    return {"step_seconds": statistics.median(seconds), "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", required=True, help="the recipe's training module, e.g. dyt_llama.train")
    parser.add_argument("--config", type=Path, help="the recipe's YAML (default: the module's own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--ranks", type=count_arg(1), default=2)
    parser.add_argument("--steps", type=count_arg(1), default=12)
    parser.add_argument("--skip", type=count_arg(0), default=3, help="first steps left out of the median (warm-up)")
    parser.add_argument("--rounds", type=count_arg(1), default=3)
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the settings in each round")
    parser.add_argument("--json", type=Path, help="also write every run and the ratios here")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} leaves no step after --skip {args.skip}")

    order = random.Random(args.seed)
    runs: list[dict] = []
    print(f"{args.module} {args.config or '(its default config)'} {' '.join(args.overrides)}; {args.ranks} rank(s), "
          f"{args.steps} steps, median after {args.skip}")
    print(f"{'round':>5} {'setting':<20} {'s / step':>9} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            settings = list(SETTINGS)
            order.shuffle(settings)
            for setting in settings:
                result = run_once(args, setting, Path(tmp) / f"{round_}-{len(runs)}")
                runs.append({"round": round_, "setting": setting, **result})
                print(f"{round_:>5} {setting:<20} {result['step_seconds']:>9.3f} {result['peak_rss_mb']:>13.0f}",
                      flush=True)

    def in_round(round_: int, setting: str) -> dict:
        return next(r for r in runs if r["round"] == round_ and r["setting"] == setting)

    ratios = {}
    print(f"median over {args.rounds} rounds of each round's ratio to glibc's defaults:")
    print(f"{'setting':<20} {'step time':>9} {'peak RSS':>9}")
    for setting in SETTINGS:
        ratios[setting] = {key: statistics.median(in_round(n, setting)[key] / in_round(n, "glibc defaults")[key]
                                                  for n in range(args.rounds))
                           for key in ("step_seconds", "peak_rss_mb")}
        print(f"{setting:<20} {ratios[setting]['step_seconds']:>8.3f}x {ratios[setting]['peak_rss_mb']:>8.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "settings": {k: {"environment": e, "overrides": o} for k, (e, o) in SETTINGS.items()},
                                         "runs": runs, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
