"""LLaMA token data at scale, measured in one run (docs/performance.md, "Token shards"):

1. ``dyt-llama-prepare`` on the built-in text corpus (1x) and on 8 copies of it with distinct
   document titles (8x), with 1 and 2 tokenising processes: wall time, tokens/s and peak RSS. Each
   run is a fresh process with an empty cache, given the same BPE tokenizer file (trained once on
   1x beforehand), so what is timed is reading, tokenising and writing the shards. Peak RSS is
   ``ru_maxrss`` of the largest process (with 2 processes: the largest of the parent and its
   workers), file-backed pages included.
2. A short tiny-LLaMA training (one rank, recipes/llama/tiny.yaml, RMSNorm) reading its windows
   from the memory map, then the same run reading the same windows as the old packing stored them
   (a ``datasets`` table saved to disk, read with the torch format): tokens/s of each (median over
   the logged steps after the first), each run in a fresh process, in the order memory map, table,
   table, memory map (``--rounds N``: that order N times; medians over the runs). Before them, in
   one process, the time to read and collate one micro-batch from each source, alternating: the
   only part of a step the source changes, measured without the runs' drift.

``python scripts/bench_prepare.py [--steps 40] [--out runs/bench-prepare] [--train-only] [--rounds 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from dyt.errors import help_description

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ["shakespeare/hamlet", "shakespeare/tempest", "austen/persuasion"]


def _corpus(source: Path, out: Path, copies: int) -> list[str]:
    """``copies`` copies of the corpus's .txt files under copy<k>/; returns the held-out titles."""
    if out.exists():
        shutil.rmtree(out)
    for k in range(copies):
        for path in sorted(source.rglob("*.txt")):
            target = out / f"copy{k}" / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return [f"copy{k}/{title}" for k in range(copies) for title in HELD_OUT]


def _prepare_process(corpus: Path, held_out: list[str], tokenizer: Path, cache: Path, processes: int) -> dict:
    """One ``dyt-llama-prepare`` run in a fresh process: wall seconds, tokens, peak RSS (MB)."""
    if cache.exists():
        shutil.rmtree(cache)
    command = [sys.executable, "-m", "dyt_llama.prepare", "--config", str(ROOT / "recipes/llama/tiny.yaml"),
               "--set", f"data.corpus={corpus}", "--set", f"data.validation_works=[{','.join(held_out)}]",
               "--set", f"data.tokenizer_file={tokenizer}", "--set", f"data.cache_dir={cache}",
               "--num-proc", str(processes)]
    # ru_maxrss of RUSAGE_CHILDREN only grows over a process's life: measure from a fresh parent.
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
             "sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:] if p.returncode else ''); sys.exit(p.returncode)")
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache / "hf-datasets")}
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"prepare failed:\n{done.stderr}")
    seconds, rss = (float(x) for x in done.stdout.split())
    from dyt_data.shards import TokenShards

    tokens = sum(len(TokenShards(folder)) for folder in (cache / "tokens").iterdir())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_rss_mb": rss}


class PackedTable:
    """The old path: packed rows saved by ``datasets``, read back as torch tensors."""

    def __init__(self, windows, folder: Path):
        import datasets

        rows = datasets.Dataset.from_dict({"input_ids": [windows[i].tolist() for i in range(len(windows))]})
        rows.save_to_disk(str(folder))
        self.rows = datasets.load_from_disk(str(folder)).with_format("torch")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]["input_ids"]


def _tiny_task(steps: int, out: Path):
    from dyt.train import load_config
    from dyt_llama.task import LlamaConfig, LlamaTask

    config = load_config(LlamaConfig, ROOT / "recipes/llama/tiny.yaml", [
        f"train.steps={steps}", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
        "train.progress=false", f"train.out_dir={out}"])
    return config, LlamaTask(config)


def _train(steps: int, out: Path, in_memory: bool) -> float:
    """Median tokens/s of a short tiny-LLaMA run (one rank), windows from the memory map or from an
    in-memory datasets table."""
    from dyt.train import Trainer, read_metrics

    config, task = _tiny_task(steps, out)
    if in_memory:
        task.train_rows = PackedTable(task.train_rows, out.parent / "packed-train")
        task.validation_rows = PackedTable(task.validation_rows, out.parent / "packed-validation")
    if out.exists():
        shutil.rmtree(out)
    Trainer(task, config.train, full_config=config).fit()
    rates = [r["throughput"] for r in read_metrics(out / "metrics.jsonl") if "throughput" in r][1:]
    return statistics.median(rates)


def _compare_fetch(args, batches: int = 400) -> dict:
    """What the data source changes in a training step, measured in one process: the time to read
    and collate one micro-batch of random windows, from the memory map and from the packed table
    alternately (the same indices for both), medians; everything else in a step is the same code on
    the same tensors, so this bounds the difference in tokens/s that run-to-run drift hides."""
    import time

    import torch

    _, task = _tiny_task(args.steps, args.out / "fetch")
    sources = {"memmap": task.train_rows, "table": PackedTable(task.train_rows, args.out / "packed-fetch")}
    size, generator = task.config.train.micro_batch_size, torch.Generator().manual_seed(0)
    seconds: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(batches):
        indices = torch.randint(len(task.train_rows), (size,), generator=generator).tolist()
        for name, rows in sources.items():
            started = time.perf_counter()
            batch = task.collate([rows[i] for i in indices])
            seconds[name].append(time.perf_counter() - started)
        assert torch.equal(task.collate([sources["memmap"][i] for i in indices]), batch)
    medians = {name: statistics.median(values) * 1e6 for name, values in seconds.items()}
    print(f"one micro-batch of {size} windows read and collated, median of {batches} (alternating): "
          f"{medians['memmap']:.0f} us from the memory map, {medians['table']:.0f} us from the packed table", flush=True)
    return {f"{name}_fetch_us": value for name, value in medians.items()}


def _compare_training(args) -> dict:
    """Tokens/s of the tiny run from the memory map and from the old packed table, each run in a
    fresh process, in ABBA order (``args.rounds`` times) against drift in the box's speed."""
    rates = {"memmap": [], "table": []}
    for source in ("memmap", "table", "table", "memmap") * args.rounds:
        done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--out", str(args.out),
                               "--train", source], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"training from {source} failed:\n{done.stderr[-3000:]}")
        rates[source].append(float(done.stdout.split()[-1]))
        print(f"tiny LLaMA, 1 rank, {args.steps} steps, rows from the {source}: {rates[source][-1]:.0f} tokens/s", flush=True)
    memmap, table = statistics.median(rates["memmap"]), statistics.median(rates["table"])
    print(f"tokens/s, median of {len(rates['memmap'])} runs each: {memmap:.0f} from the memory map, {table:.0f} from "
          f"the packed datasets table (ratio {memmap / table:.3f}); load now {os.getloadavg()[0]:.2f}", flush=True)
    return {"memmap_tokens_per_s": rates["memmap"], "table_tokens_per_s": rates["table"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-prepare")
    parser.add_argument("--train", choices=["memmap", "table"], help=argparse.SUPPRESS)  # one training run
    parser.add_argument("--train-only", action="store_true",
                        help="skip the prepare benchmark: only the training comparison (memory map vs table)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="ABBA rounds of the training comparison (each round: 2 runs from each source; "
                             "0: only the one-process micro-batch timing)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.train:
        print(_train(args.steps, args.out / f"train-{args.train}", in_memory=args.train == "table"))
        return
    from dyt.train import load_config
    from dyt_llama.corpus import prepare_corpus
    from dyt_llama.prepare import prepare
    from dyt_llama.task import LlamaConfig

    args.out.mkdir(parents=True, exist_ok=True)
    source = prepare_corpus()
    config = load_config(LlamaConfig, ROOT / "recipes/llama/tiny.yaml", [f"data.cache_dir={args.out / 'tokenizer'}"])
    tokenizer = prepare(config.data, config.model.vocab_size).tokenizer  # the BPE that training builds
    tokenizer_file = args.out / "bpe-4096.json"
    tokenizer.save(str(tokenizer_file))
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average; {os.cpu_count()} CPUs)", flush=True)

    results = {}
    if args.train_only:
        fetch = _compare_fetch(args)
        runs = _compare_training(args) if args.rounds else {}
        (args.out / "train.json").write_text(json.dumps({**fetch, **runs}, indent=1))
        return
    for copies in (1, 8):
        corpus = args.out / f"corpus-{copies}x"
        held_out = _corpus(source, corpus, copies)
        mb = sum(p.stat().st_size for p in corpus.rglob("*.txt")) / 2**20
        for processes in (1, 2):
            row = _prepare_process(corpus, held_out, tokenizer_file, args.out / f"cache-{copies}x-{processes}p", processes)
            results[f"{copies}x/{processes}p"] = {**row, "text_mb": mb}
            print(f"prepare {copies}x ({mb:.0f} MB text), {processes} process(es): {row['tokens']} tokens in "
                  f"{row['seconds']:.1f} s = {row['tokens_per_s']:.0f} tokens/s, peak RSS {row['peak_rss_mb']:.0f} MB",
                  flush=True)
    for processes in (1, 2):
        ratio = results[f"8x/{processes}p"]["peak_rss_mb"] / results[f"1x/{processes}p"]["peak_rss_mb"]
        speed = results[f"8x/{processes}p"]["tokens_per_s"] / results["8x/1p"]["tokens_per_s"]
        print(f"{processes} process(es): peak RSS 8x / 1x = {ratio:.2f} (target <= 1.3, 8x < 1500 MB); "
              f"8x tokens/s vs 1 process = {speed:.2f}", flush=True)

    results["train"] = {**_compare_fetch(args), **_compare_training(args)}
    print(f"load after: {os.getloadavg()[0]:.2f}", flush=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
