"""dyt-bench: time DyT's backends against copy, LayerNorm, RMSNorm and the LLaMA reference RMSNorm,
forward and forward+backward, on the current device, with each op's peak memory; optionally a
LLaMA-style decoder block with each norm (a recipe's whole training step: ``dyt-llama-bench``). Ops
are timed interleaved (a call of each in turn, in a new random order, then the next round), so
drift in the machine's speed hits all alike and no op always follows the same one. Prints times,
effective bandwidth, peak bytes and ratios; writes JSON.

Forward+backward passes every op the same held gradient, which the cpu backend must never write
``dx`` over (it does where a model hands it one: scripts/bench_gradient_reuse.py).

Ratios compare ops timed in this one process; absolute times depend on the machine (and on CPU on
glibc's allocator settings, recorded in the JSON: a fresh activation-sized tensor above its mmap
threshold costs page faults; and on how idle OpenMP threads wait, ``OMP_WAIT_POLICY``, also
recorded: at small shapes waking sleeping threads costs as much as the op; docs/performance.md).

Peak memory is the most bytes allocated at once above what was allocated before the op ran: on
CUDA from ``torch.cuda.max_memory_allocated``; on CPU from the profiler's allocator events
(``profile_memory``: every allocation and free of the CPU allocator, in every op, thread and C++
extension, with its time), run once, outside the timed repeats. On CPU each op's minor page faults
per timed call are counted too (``getrusage``, every thread of the process, median over the
repeats): under glibc's defaults a fresh output above 32 MiB faults in every 4 KiB page, each call.

``--training-allocator`` times the kernels a second time, after setting glibc's malloc as CPU
training ranks set it (``train.reuse_freed_memory``, :mod:`dyt.allocator`): freed blocks are kept,
fresh outputs fault in no pages, and the ratios show the kernels' own work. The setting cannot be
undone in a process, so that pass runs last.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .allocator import applied, cannot_keep_freed_blocks, keep_freed_blocks
from .backends import BackendUnavailableError, auto_backend, available_backends, device_arg, select_backend
from .errors import (
    CommandParser,
    DistinctValues,
    UserInputError,
    folder_problem,
    help_description,
    user_errors,
    user_path,
)
from .functional import dyt, residual_dyt
from .kernels.eager import dyt_eager
from .norms import NormConfig, make_norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASELINE_OPS = ("copy", "F.layer_norm", "F.rms_norm")
"""Timed whatever ``--ops`` names: every ratio in the table is to one of them."""
CUDA_SHAPES = ["4096x4096", "16384x4096", "32768x4096", "8192x8192"]


def llama_reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's baseline: LLaMA's reference RMSNorm (fp32 upcast, separate kernels)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.type_as(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     repeats: int, faults: dict[str, int] | None = None) -> dict[str, float]:
    """Median wall time of each of ``fns`` in milliseconds, timed in rounds (one call of each per
    round, ``repeats`` rounds after ``warmup``): a change in the machine's speed during the run
    (load, clocks) hits every op alike, so the ratios between them hold. Each round runs the ops in
    a new (seeded) random order: in a fixed order an op always follows the same one, and on CPU at
    1024 x 192 the second of two identical DyT calls ran 9% faster than the first for that alone.
    ``faults``, when given, receives each op's median minor page faults over the same timed calls
    (``getrusage``, every thread of this process, read outside the timed span)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    fault_samples: dict[str, list[int]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for round_index in range(warmup + repeats):
        shuffle(order)
        for name in order:
            if faults is not None:
                faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                samples[name].append(elapsed * 1e3)
                if faults is not None:
                    fault_samples[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
    if faults is not None:
        faults.update({name: int(statistics.median(counts)) for name, counts in fault_samples.items()})
    return {name: statistics.median(times) for name, times in samples.items()}


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Most bytes allocated at once while ``fn`` runs, above the level before it (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # read when the profiler first starts: no GPU-probe errors on a CPU box
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
        key=lambda event: event[0],
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@dataclass
class Op:
    """One timed op: ``run`` returns the outputs to differentiate; ``accesses`` counts the
    activation-sized tensors read or written forward and forward+backward (for GB/s)."""

    run: Callable[[], tuple[torch.Tensor, ...]]
    accesses: tuple[int, int] = (2, 5)
    backward: bool = True


def _liger_dyt():
    for module in ("liger_kernel.ops.dyt", "liger_kernel.ops"):
        try:
            return importlib.import_module(module).LigerDyTFunction
        except (ImportError, AttributeError):
            continue
    return None


def kernel_ops(x, r, weight, bias, alpha) -> dict[str, Op]:
    n = x.shape[-1]
    device = x.device
    usable = [b for b in available_backends(device) if b != "fused" or device.type == "cuda"]
    ops = {
        "copy": Op(lambda: (x.clone(),), backward=False),
        "F.layer_norm": Op(lambda: (F.layer_norm(x, (n,), weight, bias),)),
        "F.rms_norm": Op(lambda: (F.rms_norm(x, (n,), weight),)),
        "LLaMA reference RMSNorm": Op(lambda: (llama_reference_rmsnorm(x, weight),)),
    }
    for name in ("eager", *[b for b in usable if b != "eager"]):
        ops[f"DyT {name}"] = Op(lambda name=name: (dyt(x, alpha, weight, bias, backend=name),))
    if "compiled" in usable:
        # What the compiled backend improves on: torch.compile of the eager formula as it stands.
        plain = torch.compile(dyt_eager, dynamic=True)
        ops["DyT plain torch.compile"] = Op(lambda: (plain(x, alpha, weight, bias),))
    liger = _liger_dyt() if device.type == "cuda" else None
    if liger is not None:
        ops["Liger DyT"] = Op(lambda: (liger.apply(x, alpha, weight, bias),))
    best = auto_backend(device, x.numel())
    ops["add + F.rms_norm"] = Op(lambda: ((s := x + r), F.rms_norm(s, (n,), weight)), accesses=(4, 8))
    ops[f"residual DyT {best}"] = Op(lambda: residual_dyt(x, r, alpha, weight, bias, backend=best), accesses=(4, 8))
    return ops


def kernel_op_names(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> list[str]:
    """The ops :func:`run_kernels` times at this size (the residual op is named by the backend
    ``auto`` picks for it), read from :func:`kernel_ops` over stand-ins that hold no memory."""
    scalar = torch.empty((), device=device, dtype=dtype)
    x, row = scalar.expand(rows, cols), scalar.expand(cols)
    return list(kernel_ops(x, x, row, row, scalar.expand(1)))


def run_kernels(rows: int, cols: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int,
                only: Collection[str] | None = None) -> dict:
    """Every op's times, bandwidth, peak bytes (and page faults on CPU); ``only``: just these ops
    and the baselines (``--ops``)."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def make(*shape, grad=False):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(grad)

    x, r = make(rows, cols, grad=True), make(rows, cols, grad=True)
    grads = [make(rows, cols), make(rows, cols)]
    weight = torch.ones(cols, device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(cols, device=device, dtype=dtype, requires_grad=True)
    alpha = torch.full((1,), 0.5, device=device, dtype=dtype, requires_grad=True)
    leaves = (x, r, weight, bias, alpha)
    element_bytes = x.element_size() * x.numel()
    ops = {name: op for name, op in kernel_ops(x, r, weight, bias, alpha).items()
           if only is None or name in only or name in BASELINE_OPS}
    forward_only, forward_backward = {}, {}
    for name, op in ops.items():

        def forward(op=op):
            with torch.no_grad():
                op.run()

        def both(op=op):
            outputs = op.run()
            torch.autograd.backward(outputs, grads[: len(outputs)])
            for leaf in leaves:
                leaf.grad = None

        forward_only[name] = forward
        if op.backward:
            forward_backward[name] = both
    on_cpu = device.type == "cpu"
    forward_faults: dict[str, int] | None = {} if on_cpu else None
    both_faults: dict[str, int] | None = {} if on_cpu else None
    forward_ms = time_interleaved(forward_only, device, warmup, repeats, faults=forward_faults)
    both_ms = time_interleaved(forward_backward, device, warmup, repeats, faults=both_faults)
    results = {}
    for name, op in ops.items():
        fwd = forward_ms[name]
        row = {"forward_ms": fwd, "forward_GBps": op.accesses[0] * element_bytes / fwd / 1e6,
               "forward_peak_bytes": peak_bytes(forward_only[name], device)}
        if op.backward:
            both = both_ms[name]
            row.update(forward_backward_ms=both, forward_backward_GBps=op.accesses[1] * element_bytes / both / 1e6,
                       forward_backward_peak_bytes=peak_bytes(forward_backward[name], device))
        if on_cpu:
            row["forward_page_faults"] = forward_faults[name]
            if op.backward:
                row["forward_backward_page_faults"] = both_faults[name]
        results[name] = row
    return results


class DecoderBlock(nn.Module):
    """A LLaMA-style pre-norm decoder block (causal SDPA attention, SwiGLU), its norms from
    ``make_norm``: enough to time a norm inside a real block. RoPE is left out (the same in
    every variant)."""

    def __init__(self, dim: int, heads: int, ffn: int, norm: NormConfig):
        super().__init__()
        self.heads = heads
        self.attn_norm = make_norm(norm, dim, role="attention")
        self.ffn_norm = make_norm(norm, dim, role="ffn")
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.gate_up = nn.Linear(dim, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def run_block(dim, heads, ffn, tokens, dtype, device, warmup, repeats) -> dict:
    variants = {
        "rmsnorm": NormConfig(kind="rmsnorm"),
        "layernorm": NormConfig(kind="layernorm"),
        f"dyt ({auto_backend(device, tokens * dim)})": NormConfig(kind="dyt", bias=False, alpha_policy="llm"),
    }
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, tokens, dim, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    blocks = {}
    for name, norm in variants.items():
        torch.manual_seed(0)
        blocks[name] = DecoderBlock(dim, heads, ffn, norm).to(device=device, dtype=dtype)

    def infer(block):
        with torch.no_grad():
            block(x)

    def train_step(block):
        block(x).float().pow(2).mean().backward()
        block.zero_grad(set_to_none=True)
        x.grad = None

    inference = time_interleaved({n: functools.partial(infer, b) for n, b in blocks.items()}, device, warmup, repeats)
    steps = {n: functools.partial(train_step, b) for n, b in blocks.items()}
    train = time_interleaved(steps, device, warmup, repeats)
    return {name: {"inference_ms": inference[name], "train_step_ms": train[name],
                   "train_step_peak_bytes": peak_bytes(steps[name], device)} for name in blocks}


def _mb(nbytes: float) -> float:
    return nbytes / 2**20


def format_kernels(results: dict) -> str:
    ln, rms, copy = results["F.layer_norm"], results["F.rms_norm"], results["copy"]
    faults = "forward_page_faults" in copy  # counted on CPU
    lines = [
        f"{'op':28} {'fwd ms':>9} {'fwd GB/s':>9} {'fwd+bwd ms':>11} {'GB/s':>7} "
        f"{'fwd/copy':>9} {'fwd/LN':>7} {'f+b/LN':>7} {'fwd/RMS':>8} {'f+b/RMS':>8} "
        f"{'fwd MB':>8} {'f+b MB':>8} {'f+b MB/LN':>10}" + (f" {'f+b faults':>10}" if faults else "")
    ]
    for name, row in results.items():
        both = row.get("forward_backward_ms", math.nan)
        both_peak = row.get("forward_backward_peak_bytes", math.nan)
        lines.append(
            f"{name:28} {row['forward_ms']:9.3f} {row['forward_GBps']:9.1f} {both:11.3f} "
            f"{row.get('forward_backward_GBps', math.nan):7.1f} {row['forward_ms'] / copy['forward_ms']:9.2f} "
            f"{row['forward_ms'] / ln['forward_ms']:7.2f} {both / ln['forward_backward_ms']:7.2f} "
            f"{row['forward_ms'] / rms['forward_ms']:8.2f} {both / rms['forward_backward_ms']:8.2f} "
            f"{_mb(row['forward_peak_bytes']):8.1f} {_mb(both_peak):8.1f} "
            f"{both_peak / ln['forward_backward_peak_bytes']:10.2f}"
            + (f" {row.get('forward_backward_page_faults', math.nan):10.0f}" if faults else "")
        )
    return "\n".join(lines)


def format_block(results: dict) -> str:
    base = results["rmsnorm"]
    lines = [f"{'norm':20} {'inference ms':>13} {'train step ms':>14} {'inf/RMS':>8} {'train/RMS':>10} "
             f"{'peak MB':>8} {'peak/RMS':>9}"]
    for name, row in results.items():
        lines.append(
            f"{name:20} {row['inference_ms']:13.3f} {row['train_step_ms']:14.3f} "
            f"{row['inference_ms'] / base['inference_ms']:8.2f} {row['train_step_ms'] / base['train_step_ms']:10.2f} "
            f"{_mb(row['train_step_peak_bytes']):8.1f} "
            f"{row['train_step_peak_bytes'] / base['train_step_peak_bytes']:9.2f}"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that change what a fresh CPU tensor costs: glibc's malloc thresholds
# (MALLOC_*) and tunables (GLIBC_TUNABLES, e.g. glibc.malloc.hugetlb=1: 2 MB pages for its mmaps,
# which halved both LayerNorm's and DyT's time at 8192 x 1024), torch's huge-page switch, and an
# allocator swapped in with LD_PRELOAD (jemalloc, tcmalloc).
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


def is_allocator_setting(name: str) -> bool:
    """Whether the environment variable ``name`` changes what a fresh CPU tensor costs."""
    return name.startswith("MALLOC_") or name in ALLOCATOR_ENV


def allocator_env() -> dict[str, str]:
    """The allocator settings of the environment, and any mallopt this process made (a training run
    in the same process: :mod:`dyt.allocator`)."""
    made = {f"mallopt {name}": str(value) for name, value in applied().items()}
    return {**{k: v for k, v in os.environ.items() if is_allocator_setting(k)}, **made}


def machine_info(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),  # other work on the machine while it ran (1, 5, 15 min)
        "allocator_env": allocator_env(),
        # how idle OpenMP threads wait: with PASSIVE every parallel region wakes sleeping threads,
        # which at 1024 x 192 moved DyT / LayerNorm from 1.00x to 0.85x (docs/performance.md)
        "openmp_env": {k: v for k, v in os.environ.items() if k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def cpu_timing_header(rounds: int, allocator: str | None = None) -> str:
    """The first line of a CPU timing script's output: the machine, torch, threads, rounds, load and
    the allocator and OpenMP settings the ratios below were measured under."""
    machine = machine_info(torch.device("cpu"))
    return (f"{machine['device']}, torch {machine['torch']}, {machine['threads']} threads, fp32, median of "
            f"{rounds} interleaved rounds, load average {machine['load_average'][0]:.2f}, allocator "
            f"{allocator or machine['allocator_env'] or 'glibc defaults'}, OpenMP {machine['openmp_env'] or 'default'}")


def shape_arg(text: str) -> tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    try:
        shape = int(rows), int(cols)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxCOLS (e.g. 8192x1024)") from None
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: rows and columns must be at least 1")
    return shape


def _block_size(text: str) -> tuple[int, int, int, int]:
    try:
        dim, heads, ffn, tokens = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not DIM,HEADS,FFN,TOKENS (e.g. 512,8,1376,512)") from None
    if min(dim, heads, ffn, tokens) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be at least 1")
    if dim % heads or (dim // heads) % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: DIM ({dim}) must divide into HEADS ({heads}) heads of even size")
    return dim, heads, ffn, tokens


def count_arg(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be at least {least}")
        return value

    parse.__name__ = "int"
    return parse


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every timing command shares (``dyt-bench``, ``dyt-llama-bench``): device, dtype,
    warm-up, repeats and where the JSON goes; :func:`checked_timing_arguments` checks them."""
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=count_arg(0), default=5)
    parser.add_argument("--repeats", type=count_arg(1), default=20)
    parser.add_argument("--json", type=user_path, help="write the results here")


def checked_timing_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.dtype:
    """Stops the command before anything is timed where the default DyT backend (``DYT_BACKEND``,
    which the DyT layers of blocks and models take) cannot run on the device, or ``--json`` cannot
    be written; returns the dtype to time in."""
    try:
        select_backend(None, args.device)
    except (BackendUnavailableError, ValueError) as error:
        parser.error(f"DYT_BACKEND: {error}")
    if args.json is not None:  # found now, not when the results are written after the timing
        if args.json.exists() and not args.json.is_file():
            parser.error(f"argument --json: {args.json} is not a file")
        if problem := folder_problem(args.json.parent):
            parser.error(f"argument --json: {args.json}: {problem}")
        nearest = next(p for p in (args.json, *args.json.parents) if p.exists())
        if not os.access(nearest, os.W_OK):
            parser.error(f"argument --json: {args.json}: {nearest} is not writable here")
    return DTYPES[args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")]


def timing_header(command: str, device: torch.device, machine: dict, dtype: torch.dtype, what: str) -> str:
    """The line a timing command prints before it times anything: the machine, torch and Triton, the
    threads, the dtype, ``what`` is timed, and the load, allocator and OpenMP settings that move the
    ratios on CPU (docs/performance.md)."""
    return (f"{command} on {device} ({machine['device']}, torch {machine['torch']}, "
            f"triton {machine.get('triton', '-')}, {machine['threads']} CPU threads), {dtype}, {what}; "
            f"load average {machine['load_average'][0]:.2f}; allocator {machine['allocator_env'] or 'glibc defaults'}; "
            f"OpenMP waiting {machine['openmp_env'] or 'default (spin, then sleep)'}")


def write_results(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {path}")


@user_errors("dyt-bench")
def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="dyt-bench", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", dest="shapes", action="append", type=shape_arg,
                        help=f"ROWSxCOLS, repeatable (default: 8192x1024 on CPU; {', '.join(CUDA_SHAPES)} on CUDA)")
    parser.add_argument("--block", action="store_true", help="also time a decoder block with each norm")
    parser.add_argument("--block-size", type=_block_size, default=None, metavar="DIM,HEADS,FFN,TOKENS",
                        help="the decoder block's size (implies --block); default: 4096,32,11008,4096 (LLaMA-7B) on "
                             "CUDA, 512,8,1376,512 on CPU")
    parser.add_argument("--training-allocator", action="store_true",
                        help="then time the kernels again with glibc's malloc set as CPU training ranks set it "
                             "(train.reuse_freed_memory: freed blocks kept, no page faults for fresh outputs); "
                             "CPU and glibc only; the setting stays for the rest of the process, so this pass runs last")
    parser.add_argument("--ops", nargs="+", metavar="OP", action=DistinctValues,
                        help=f"time only these ops, named as the table names them (e.g. 'DyT cpu'), besides "
                             f"{', '.join(BASELINE_OPS)}, the ratios' baselines (default: every op)")
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    device = args.device  # every option is checked before the first op is timed
    args.block = args.block or args.block_size is not None  # a size asks for the block it sizes
    if args.training_allocator:
        if device.type != "cpu":
            parser.error("argument --training-allocator: glibc's malloc holds host memory only; use --device cpu")
        reason = cannot_keep_freed_blocks()
        if reason:
            parser.error(f"argument --training-allocator: {reason}, and CPU training ranks would leave malloc as it "
                         "is too: the first pass already times the kernels as they allocate")
    dtype = checked_timing_arguments(parser, args)

    on_cuda = device.type == "cuda"
    shapes = args.shapes or ([shape_arg(s) for s in CUDA_SHAPES] if on_cuda else [(8192, 1024)])
    for rows, cols in shapes if args.ops else ():
        names = kernel_op_names(rows, cols, dtype, device)
        if unknown := [op for op in args.ops if op not in names]:
            parser.error(f"argument --ops: {', '.join(map(repr, unknown))}: not {'ops' if len(unknown) > 1 else 'an op'} "
                         f"timed at {rows}x{cols} on {device.type} ({', '.join(map(repr, names))})")
    machine = machine_info(device)
    print(timing_header("dyt-bench", device, machine, dtype,
                        f"median of {args.repeats} interleaved rounds; 'auto' = {auto_backend(device)}"))
    payload: dict = {"machine": machine, "dtype": str(dtype).removeprefix("torch."), "ops": args.ops, "kernels": {}}

    def time_kernels(into: dict, heading: str = "") -> None:
        for rows, cols in shapes:
            into[f"{rows}x{cols}"] = results = run_kernels(rows, cols, dtype, device, args.warmup, args.repeats,
                                                           args.ops)
            print(f"\n{rows} x {cols}{heading}\n{format_kernels(results)}")

    time_kernels(payload["kernels"])
    if args.block:
        dim, heads, ffn, tokens = args.block_size or ((4096, 32, 11008, 4096) if on_cuda else (512, 8, 1376, 512))
        results = run_block(dim, heads, ffn, tokens, dtype, device, args.warmup, args.repeats)
        payload["block"] = {"size": [dim, heads, ffn, tokens], "results": results}
        print(f"\ndecoder block dim {dim}, {heads} heads, ffn {ffn}, {tokens} tokens\n{format_block(results)}")
    if args.training_allocator:
        said = keep_freed_blocks()
        if not applied():  # glibc refused mallopt
            raise UserInputError(f"--training-allocator: {said}")
        payload["training_allocator"] = {"allocator_env": allocator_env(), "kernels": {}}
        print(f"\nagain, as CPU training ranks allocate ({said})")
        time_kernels(payload["training_allocator"]["kernels"], ", training's allocator")
    write_results(args.json, payload)


if __name__ == "__main__":
    main()
