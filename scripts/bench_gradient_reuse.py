"""The cpu backend writing dx over the incoming gradient, timed where a model would use it.

`dyt-bench` passes every op the same held gradient (``y.backward(g)``), which the kernels must never
write over. In a model the gradient reaching a norm is the next layer's temporary; this script gives
each op one (the next layer is ``y * g``: its backward makes a new tensor), so the cpu backend's
backward can write dx into it. It times forward + backward of F.layer_norm, F.rms_norm and DyT (cpu)
with the reuse on and off, interleaved in one process (median of the rounds), with each one's peak
memory, and checks that the two DyT runs give the same gradients bit for bit.

    python scripts/bench_gradient_reuse.py --shape 8192x1024 --shape 1024x192
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dyt.bench import count_arg, cpu_timing_header, peak_bytes, shape_arg, time_interleaved
from dyt.errors import help_description
from dyt.functional import dyt
from dyt.kernels import cpu_fused


def measure(rows: int, cols: int, warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=generator).requires_grad_()
    next_layer = torch.randn(rows, cols, generator=generator)  # y * next_layer: the model's next op
    weight, bias = torch.ones(cols, requires_grad=True), torch.zeros(cols, requires_grad=True)
    alpha = torch.full((1,), 0.5, requires_grad=True)
    leaves = (x, weight, bias, alpha)

    def step(norm, reuse=True):
        def run():
            cpu_fused.reuse_gradient_buffers(reuse)
            (norm() * next_layer).sum().backward()
            grads = [leaf.grad for leaf in leaves]
            for leaf in leaves:
                leaf.grad = None
            return grads
        return run

    ops = {
        "F.layer_norm": step(lambda: F.layer_norm(x, (cols,), weight, bias)),
        "F.rms_norm": step(lambda: F.rms_norm(x, (cols,), weight)),
        "DyT cpu, dx over the gradient": step(lambda: dyt(x, alpha, weight, bias, backend="cpu"), reuse=True),
        "DyT cpu, dx a new tensor": step(lambda: dyt(x, alpha, weight, bias, backend="cpu"), reuse=False),
    }
    same = all(torch.equal(a, b) for a, b in zip(ops["DyT cpu, dx over the gradient"](),
                                                  ops["DyT cpu, dx a new tensor"]()))
    if not same:
        raise SystemExit("bench_gradient_reuse: DyT's gradients differ with the reuse on and off")
    times = time_interleaved(ops, torch.device("cpu"), warmup, rounds)
    results = {name: {"ms": ms, "peak_MB": peak_bytes(ops[name], torch.device("cpu")) / 2**20}
               for name, ms in times.items()}
    cpu_fused.reuse_gradient_buffers(True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", dest="shapes", action="append", type=shape_arg, help="ROWSxCOLS, repeatable "
                        "(default: 8192x1024 and 1024x192)")
    parser.add_argument("--warmup", type=count_arg(0), default=3)
    parser.add_argument("--rounds", type=count_arg(1), default=15)
    args = parser.parse_args()
    if not cpu_fused.reuse_gradient_buffers():
        raise SystemExit("bench_gradient_reuse: the cpu backend does not reuse gradients on this torch "
                         "(owned_gradient_refs() is 0), so there is nothing to compare")
    print(cpu_timing_header(args.rounds))
    print("forward + backward of norm(x) * g (same gradients with the reuse on and off: checked)")
    for rows, cols in args.shapes or [(8192, 1024), (1024, 192)]:
        results = measure(rows, cols, args.warmup, args.rounds)
        ln = results["F.layer_norm"]
        print(f"\n{rows} x {cols}\n{'op':32s} {'ms':>9s} {'/ LN':>6s} {'peak MB':>8s} {'/ LN':>6s}")
        for name, row in results.items():
            print(f"{name:32s} {row['ms']:9.3f} {row['ms'] / ln['ms']:6.2f} {row['peak_MB']:8.1f} "
                  f"{row['peak_MB'] / ln['peak_MB']:6.2f}")


if __name__ == "__main__":
    main()
