"""dyt-bench: time every available DyT backend against LayerNorm, RMSNorm and the LLaMA reference
RMSNorm on the current device, forward and forward+backward; print times and ratios, write JSON.

The ratios compare ops measured in this one process; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .backends import auto_backend, available_backends
from .functional import dyt
from .kernels.eager import dyt_eager

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llama_reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's baseline: LLaMA's reference RMSNorm (fp32 upcast, separate kernels)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.type_as(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def candidates(x, weight, bias, alpha) -> dict[str, Callable[[], torch.Tensor]]:
    n = x.shape[-1]
    ops: dict[str, Callable[[], torch.Tensor]] = {
        "F.layer_norm": lambda: F.layer_norm(x, (n,), weight, bias),
        "F.rms_norm": lambda: F.rms_norm(x, (n,), weight),
        "LLaMA reference RMSNorm": lambda: llama_reference_rmsnorm(x, weight),
    }
    usable = [b for b in available_backends(x.device) if b != "fused" or x.device.type == "cuda"]
    for name in ("eager", *[b for b in usable if b != "eager"]):
        ops[f"DyT {name}"] = lambda name=name: dyt(x, alpha, weight, bias, backend=name)
    if "compiled" in available_backends(x.device):
        # What the compiled backend improves on: torch.compile of the eager formula as it stands.
        plain = torch.compile(dyt_eager, dynamic=True)
        ops["DyT plain torch.compile"] = lambda: plain(x, alpha, weight, bias)
    return ops


def run(rows: int, cols: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, cols, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(rows, cols, generator=generator).to(device=device, dtype=dtype)
    weight = torch.ones(cols, device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(cols, device=device, dtype=dtype, requires_grad=True)
    alpha = torch.full((1,), 0.5, device=device, dtype=dtype, requires_grad=True)
    results = {}
    for name, op in candidates(x, weight, bias, alpha).items():

        def forward_only(op=op):
            with torch.no_grad():
                op()

        def forward_backward(op=op):
            op().backward(dy)
            x.grad = weight.grad = bias.grad = alpha.grad = None

        results[name] = {
            "forward_ms": time_ms(forward_only, device, warmup, repeats),
            "forward_backward_ms": time_ms(forward_backward, device, warmup, repeats),
        }
    return results


def format_table(results: dict, baseline: str = "F.layer_norm") -> str:
    base = results[baseline]
    lines = [
        f"{'op':28} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd / LN':>9} {'fwd+bwd / LN':>13}",
    ]
    for name, r in results.items():
        lines.append(
            f"{name:28} {r['forward_ms']:9.2f} {r['forward_backward_ms']:11.2f} "
            f"{r['forward_ms'] / base['forward_ms']:9.2f} "
            f"{r['forward_backward_ms'] / base['forward_backward_ms']:13.2f}"
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dyt-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    results = run(args.rows, args.cols, DTYPES[args.dtype], device, args.warmup, args.repeats)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"dyt-bench {args.rows}x{args.cols} {args.dtype} on {device} ({machine['device']}, "
          f"{machine['threads']} threads, torch {machine['torch']}); median of {args.repeats}")
    print(format_table(results))
    print(f"'auto' here resolves to: {auto_backend(device)}")
    payload = {"shape": [args.rows, args.cols], "dtype": args.dtype, "machine": machine, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
