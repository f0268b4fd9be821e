"""The cpu backend's kernels against an earlier version of them, in one process.

``--old`` names an earlier ``dyt_cpu.cpp`` (e.g. ``git show REV:packages/dyt-core/src/dyt/kernels/
csrc/dyt_cpu.cpp > /tmp/old.cpp``); it is built like the current one (its own cached build, named
by its digest) and both are loaded side by side. Forward + backward of DyT with each, and of
F.layer_norm, are timed in interleaved rounds (median), so a change in the machine's speed hits all
three alike: the ratios new / old and each / LayerNorm hold within the run. Gradients of the two
versions are printed as their largest difference (they need not agree bit for bit: a kernel change
may sum in another order). Before timing, both versions' outputs (forward y and s, backward dx and
the parameter gradients) are compared bit for bit on small cases that reach every path of the
kernels: each dtype, tails, rows wider than one d alpha span, residual, bias, row-strided input.
``--training-allocator`` first sets glibc's malloc as CPU training
ranks set it (no page faults for fresh outputs).

    python scripts/bench_cpu_kernel_ab.py --old /tmp/old.cpp [--shape 8192x1024 --shape 1024x192]
        [--rounds 60] [--training-allocator]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from dyt.allocator import keep_freed_blocks
from dyt.bench import count_arg, cpu_timing_header, shape_arg, time_interleaved
from dyt.errors import help_description
from dyt.functional import dyt
from dyt.kernels import cpu_fused
from dyt.kernels.cpp_build import CpuExtension, CpuKernelBuildError


def measure(kernels: dict[str, object], rows: int, cols: int, warmup: int, rounds: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=generator, requires_grad=True)
    dy = torch.randn(rows, cols, generator=generator)
    alpha = torch.tensor([0.5], requires_grad=True)
    weight = torch.randn(cols, generator=generator).requires_grad_()
    bias = torch.zeros(cols, requires_grad=True)
    ln_weight, ln_bias = torch.ones(cols, requires_grad=True), torch.zeros(cols, requires_grad=True)
    load = cpu_fused.load

    def with_kernels(module):
        def run():
            cpu_fused.load = lambda: module  # the backend calls cpu_fused.load() for its extension
            try:
                dyt(x, alpha, weight, bias, backend="cpu").backward(dy)
            finally:
                cpu_fused.load = load
            grads = [t.grad for t in (x, alpha, weight, bias)]
            for t in (x, alpha, weight, bias):
                t.grad = None
            return grads
        return run

    ops = {f"DyT cpu ({name})": with_kernels(module) for name, module in kernels.items()}
    differences = [(a - b).abs().max().item() for a, b in zip(*(op() for op in ops.values()))]
    ops["F.layer_norm"] = lambda: F.layer_norm(x, (cols,), ln_weight, ln_bias).backward(dy)
    times = time_interleaved(ops, torch.device("cpu"), warmup, rounds)
    times["largest gradient difference (x, alpha, weight, bias)"] = differences
    return times


# Small cases reaching every path: each dtype; tails at several lane positions; rows wider than one d
# alpha span (2048 fp32 columns on AVX2, 4096 on AVX-512); residual; bias; row-strided input.
CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CHECK_SHAPES = ((1, 1), (3, 7), (5, 17), (300, 129), (2, 2048), (33, 4097), (7, 5000))
OUTPUTS = ("y", "s", "dx", "d alpha", "d weight", "d bias")


def differing_outputs(new, old) -> tuple[int, list[str]]:
    """Both versions' forward and backward on the check cases: (how many cases, one line per output
    whose bits differ between them, with the case and the largest difference)."""
    generator = torch.Generator().manual_seed(0)
    cases, differing = 0, []
    for dtype, (rows, cols), residual, bias, strided in itertools.product(
            CHECK_DTYPES, CHECK_SHAPES, (False, True), (False, True), (False, True)):
        params = torch.float64 if dtype == torch.float64 else torch.float32

        def draw(*shape, to=dtype):
            return (3 * torch.randn(*shape, generator=generator)).to(to)

        x = draw(rows, 2 * cols)[:, :cols] if strided else draw(rows, cols)
        r, ds = (draw(rows, cols), draw(rows, cols)) if residual else (None, None)
        dy = draw(rows, cols)
        alpha, weight = torch.tensor([0.7], dtype=params), draw(cols, to=params)
        b = draw(cols, to=params) if bias else None
        results = []
        for kernels in (new, old):
            y, s = kernels.forward(x, r, alpha, weight, b)
            results.append((y, s, *kernels.backward(dy, s if residual else x, alpha, weight, bias, ds)))
        cases += 1
        for name, a, o in zip(OUTPUTS, *results):
            if a is not None and not torch.equal(a, o):
                differing.append(f"{name}, {str(dtype).removeprefix('torch.')} {rows}x{cols} residual={residual} "
                                 f"bias={bias} strided={strided}: {(a.double() - o.double()).abs().max().item():.2e}")
    return cases, differing


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="an earlier dyt_cpu.cpp")
    parser.add_argument("--shape", dest="shapes", action="append", type=shape_arg,
                        help="ROWSxCOLS, repeatable (default: 8192x1024 and 1024x192)")
    parser.add_argument("--warmup", type=count_arg(0), default=5)
    parser.add_argument("--rounds", type=count_arg(1), default=60)
    parser.add_argument("--training-allocator", action="store_true",
                        help="glibc's malloc as CPU training ranks set it (freed blocks kept) before timing")
    args = parser.parse_args()
    if not args.old.is_file() or args.old.suffix != ".cpp":
        parser.error(f"argument --old: {args.old} is not a .cpp file (the compiler goes by the suffix)")
    new = cpu_fused.load()
    try:
        old = CpuExtension("dyt_cpu", args.old, what="C++ kernels", unavailable="--old", instead="").load()
    except CpuKernelBuildError as error:
        parser.exit(1, f"bench_cpu_kernel_ab.py: --old {args.old}: {error}\n")
    cases, differing = differing_outputs(new, old)
    if differing:
        print(f"outputs old vs new: {len(differing)} differ over {cases} cases (largest difference each):")
        print("\n".join(f"  {line}" for line in differing))
    else:
        print(f"outputs old vs new ({', '.join(OUTPUTS)}): the same bits in all {cases} cases")
    print(cpu_timing_header(args.rounds, keep_freed_blocks().removeprefix("allocator: ") if args.training_allocator else None))
    for rows, cols in args.shapes or [(8192, 1024), (1024, 192)]:
        times = measure({"new": new, "old": old}, rows, cols, args.warmup, args.rounds)
        difference = times.pop("largest gradient difference (x, alpha, weight, bias)")
        ln = times["F.layer_norm"]
        print(f"\n{rows} x {cols}: new / old {times['DyT cpu (new)'] / times['DyT cpu (old)']:.3f}; "
              f"largest gradient difference (x, alpha, weight, bias) " + ", ".join(f"{d:.2e}" for d in difference))
        for name, ms in times.items():
            print(f"  {name:16s} {ms:9.3f} ms  {ms / ln:5.2f} x F.layer_norm")


if __name__ == "__main__":
    main()
