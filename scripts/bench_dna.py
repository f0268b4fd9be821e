"""DNA benchmarks on this machine, printed as measured in one run (not timed tests):

1. Caduceus' pure-PyTorch chunked selective scan against the step-by-step loop, forward + backward,
   at length 4096 (and the agreement of their outputs);
2. HyenaDNA forward + backward time against sequence length 1k..32k, with the fitted exponent
   (FFT convolution: ~1 plus a log factor; attention would be ~2).

    python scripts/bench_dna.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from dyt import NormConfig
from dyt_dna.config import DnaModelConfig
from dyt_dna.hyena import HyenaDNA
from dyt_dna.scan import selective_scan, selective_scan_reference


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def scan_case(batch: int, channels: int, state: int, length: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, length)
    dt = torch.nn.functional.softplus(torch.randn(batch, channels, length) - 3)
    A = -torch.arange(1, state + 1.0).repeat(channels, 1)
    B, C = torch.randn(batch, state, length), torch.randn(batch, state, length)
    D = torch.ones(channels)

    def run(scan):
        inputs = [t.clone().requires_grad_() for t in (x, dt, B, C)]
        scan(inputs[0], inputs[1], A, inputs[2], inputs[3], D).sum().backward()

    with torch.no_grad():
        error = (selective_scan(x, dt, A, B, C, D) - selective_scan_reference(x, dt, A, B, C, D)).abs().max().item()
    loop, chunked = timed(lambda: run(selective_scan_reference)), timed(lambda: run(selective_scan))
    return {"shape": [batch, channels, state, length], "loop_s": loop, "chunked_s": chunked,
            "speedup": loop / chunked, "max_abs_difference": error}


def hyena_scaling(lengths: list[int], dim: int) -> list[dict]:
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        model = HyenaDNA(DnaModelConfig(arch="hyena", dim=dim, layers=2, max_len=length, norm=NormConfig(kind="layernorm")))
        tokens = torch.randint(2, 6, (1, length))
        step = lambda model=model, tokens=tokens: model(tokens).sum().backward()  # noqa: E731
        rows.append({"length": length, "seconds": timed(step, repeats=2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    scans = [scan_case(1, 128, 16, 4096), scan_case(1, 16, 4, 4096), scan_case(8, 64, 8, 512)]
    for case in scans:
        b, d, n, length = case["shape"]
        print(f"scan b={b} d={d} n={n} L={length}: loop {case['loop_s'] * 1e3:.0f} ms, chunked "
              f"{case['chunked_s'] * 1e3:.0f} ms -> {case['speedup']:.1f}x (max |diff| {case['max_abs_difference']:.1e})")
    scaling = hyena_scaling([1024, 2048, 4096, 8192, 16384, 32768], dim=64)
    for row in scaling:
        print(f"HyenaDNA d=64, 2 layers, fwd+bwd at L={row['length']:>6}: {row['seconds'] * 1e3:8.1f} ms")
    first, last = scaling[0], scaling[-1]
    exponent = math.log(last["seconds"] / first["seconds"]) / math.log(last["length"] / first["length"])
    print(f"time ~ L^{exponent:.2f} from 1k to 32k (L log L gives ~1.1 over this range; L^2 gives 2)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"scan": scans, "hyena": scaling, "exponent": exponent}, handle, indent=1)


if __name__ == "__main__":
    main()
