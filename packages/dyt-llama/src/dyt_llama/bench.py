"""dyt-llama-bench: time a LLaMA recipe's whole training step (forward, cross-entropy, backward, AdamW
step) with RMSNorm, LayerNorm and DyT, one batch of the recipe's micro-batch size and sequence
length, on the current device, with each step's peak memory. The norms' steps are interleaved (one
step of each per round, in a new random order, then the next round), so a change in the machine's
load hits all alike; each norm's time is its median step. Prints times and ratios to RMSNorm;
writes JSON. The kernels alone: ``dyt-bench``.

Example (the tiny model, as issue 15's training-step target measures it):

    dyt-llama-bench --config recipes/llama/tiny.yaml --json runs/llama-bench.json
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from dyt.backends import auto_backend
from dyt.bench import (
    add_timing_arguments,
    checked_timing_arguments,
    machine_info,
    peak_bytes,
    time_interleaved,
    timing_header,
    write_results,
)
from dyt.errors import CommandParser, help_description, user_errors, user_path
from dyt.norms import norm_variant_overrides
from dyt.train.config import load_config

from .model import Llama
from .recipe import SPEC
from .task import LlamaConfig

NORMS = ("rmsnorm", "layernorm", "dyt")
"""The norms timed, each set as the comparisons set it (:func:`dyt.norm_variant_overrides`); the
first is what the ratios divide by."""


def norm_configs(config_path: Path) -> dict[str, LlamaConfig]:
    """The recipe's config with each norm of :data:`NORMS`: loaded before any timing, so a bad recipe
    stops the command at once."""
    return {name: load_config(LlamaConfig, config_path, norm_variant_overrides(name), check_files=False)
            for name in NORMS}


def time_steps(configs: dict[str, LlamaConfig], dtype: torch.dtype, device: torch.device, warmup: int,
               repeats: int) -> dict:
    """Each norm's median training step (ms) and its peak bytes, steps interleaved (module doc)."""
    variants = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = Llama(config.model).to(device=device, dtype=dtype)
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=config.train.lr))
    generator = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(config.model.vocab_size, (config.train.micro_batch_size, config.data.seq_len + 1),
                          generator=generator).to(device)

    def step(model, optimizer):
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {name: functools.partial(step, *variant) for name, variant in variants.items()}
    step_ms = time_interleaved(steps, device, warmup, repeats)
    tokens = config.train.micro_batch_size * config.data.seq_len
    return {
        "tokens_per_step": tokens,
        "dyt_backend": auto_backend(device, tokens * config.model.dim),
        "results": {name: {"train_step_ms": step_ms[name], "train_step_peak_bytes": peak_bytes(steps[name], device)}
                    for name in variants},
    }


def format_steps(results: dict) -> str:
    base = results[NORMS[0]]
    lines = [f"{'norm':12} {'train step ms':>14} {'train/RMS':>10} {'peak MB':>8} {'peak/RMS':>9}"]
    for name, row in results.items():
        lines.append(
            f"{name:12} {row['train_step_ms']:14.3f} {row['train_step_ms'] / base['train_step_ms']:10.2f} "
            f"{row['train_step_peak_bytes'] / 2**20:8.1f} "
            f"{row['train_step_peak_bytes'] / base['train_step_peak_bytes']:9.2f}"
        )
    return "\n".join(lines)


@user_errors("dyt-llama-bench")
def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="dyt-llama-bench", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=user_path, default=SPEC.config_path(),
                        help="the recipe (default: the tiny config shipped with dyt_llama, recipes/llama/tiny.yaml)")
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"argument --config: {args.config} is not a file")
    dtype = checked_timing_arguments(parser, args)
    configs = norm_configs(args.config)

    machine = machine_info(args.device)
    print(timing_header("dyt-llama-bench", args.device, machine, dtype,
                        f"{args.config}, median of {args.repeats} interleaved steps"))
    timed = time_steps(configs, dtype, args.device, args.warmup, args.repeats)
    print(f"{timed['tokens_per_step']} tokens a step, DyT backend {timed['dyt_backend']}\n{format_steps(timed['results'])}")
    write_results(args.json, {"machine": machine, "dtype": str(dtype).removeprefix("torch."), "config": str(args.config),
                               **timed})


if __name__ == "__main__":
    main()
