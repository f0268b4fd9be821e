"""DNA benchmarks on this machine, printed as measured in one run (not timed tests):

1. Caduceus' selective scan, forward + backward: the step-by-step loop, the pure-PyTorch chunked
   scan and the C++ CPU kernel (``dyt_dna.scan_cpu``), with their agreement, and one tiny-Caduceus
   training step (batch 8, 256 bases) with the chunked scan and with the kernel;
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
from dyt.errors import help_description
from dyt_dna import caduceus
from dyt_dna.config import DnaModelConfig
from dyt_dna.hyena import HyenaDNA
from dyt_dna.scan import selective_scan, selective_scan_reference
from dyt_dna.scan_cpu import available as cpp_scan_available
from dyt_dna.scan_cpu import selective_scan_cpu


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
        reference = selective_scan_reference(x, dt, A, B, C, D)
        error = (selective_scan(x, dt, A, B, C, D) - reference).abs().max().item()
        cpp_error = (selective_scan_cpu(x, dt, A, B, C, D) - reference).abs().max().item()
    loop, chunked = timed(lambda: run(selective_scan_reference)), timed(lambda: run(selective_scan))
    cpp = timed(lambda: run(selective_scan_cpu))
    return {"shape": [batch, channels, state, length], "loop_s": loop, "chunked_s": chunked, "cpp_s": cpp,
            "speedup": loop / chunked, "cpp_speedup_vs_chunked": chunked / cpp,
            "max_abs_difference": error, "cpp_max_abs_difference": cpp_error}


def caduceus_step(use_kernel: bool) -> float:
    """One tiny-Caduceus training step (the shipped config's model, batch 8 x 256 bases)."""
    torch.manual_seed(0)
    model = caduceus.Caduceus(DnaModelConfig(arch="caduceus", dim=64, layers=2, max_len=256,
                                             norm=NormConfig(kind="rmsnorm")))
    tokens = torch.randint(2, 6, (8, 256))
    original = caduceus.scan
    caduceus.scan = lambda *args: original(*args, use_kernel=use_kernel)
    try:
        return timed(lambda: model(tokens).float().mean().backward(), repeats=5)
    finally:
        caduceus.scan = original


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
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not cpp_scan_available():
        raise SystemExit("the C++ selective scan could not be built here (see the warning above)")
    scans = [scan_case(1, 128, 16, 4096), scan_case(1, 16, 4, 4096), scan_case(8, 64, 8, 256)]
    for case in scans:
        b, d, n, length = case["shape"]
        print(f"scan b={b} d={d} n={n} L={length}: loop {case['loop_s'] * 1e3:.0f} ms, chunked "
              f"{case['chunked_s'] * 1e3:.0f} ms ({case['speedup']:.1f}x the loop, max |diff| "
              f"{case['max_abs_difference']:.1e}), C++ {case['cpp_s'] * 1e3:.1f} ms "
              f"({case['cpp_speedup_vs_chunked']:.1f}x the chunked scan, max |diff| {case['cpp_max_abs_difference']:.1e})")
    step_chunked, step_cpp = caduceus_step(False), caduceus_step(True)
    print(f"tiny Caduceus training step (8 x 256 bases): chunked scan {step_chunked * 1e3:.0f} ms, "
          f"C++ scan {step_cpp * 1e3:.0f} ms -> {step_chunked / step_cpp:.1f}x")
    scaling = hyena_scaling([1024, 2048, 4096, 8192, 16384, 32768], dim=64)
    for row in scaling:
        print(f"HyenaDNA d=64, 2 layers, fwd+bwd at L={row['length']:>6}: {row['seconds'] * 1e3:8.1f} ms")
    first, last = scaling[0], scaling[-1]
    exponent = math.log(last["seconds"] / first["seconds"]) / math.log(last["length"] / first["length"])
    print(f"time ~ L^{exponent:.2f} from 1k to 32k (L log L gives ~1.1 over this range; L^2 gives 2)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"scan": scans, "caduceus_step_s": {"chunked": step_chunked, "cpp": step_cpp},
                       "hyena": scaling, "exponent": exponent}, handle, indent=1)


if __name__ == "__main__":
    main()
