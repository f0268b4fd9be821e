"""The selective scan as a C++ CPU kernel (csrc/selective_scan_cpu.cpp): one sequential pass per
(batch, channel) row, the state dimension vectorised, rows in parallel; the backward recomputes a
row's states and runs the state-gradient recurrence in reverse.

The chunked PyTorch scan (:func:`dyt_dna.scan.selective_scan`) spends Caduceus' training step in
float64 elementwise ops over (b, d, n, l) tensors; this kernel touches each value once each way
(timings in docs/performance.md, ``scripts/bench_dna.py``). Built with the ``cpu`` DyT backend's
builder (:mod:`dyt.kernels.cpp_build`) at first use and cached; where it cannot be built the chunked
scan runs instead, announced once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dyt.kernels.cpp_build import CpuExtension

EXTENSION = CpuExtension("dyt_dna_selective_scan", Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp",
                         what="C++ selective scan", unavailable="dyt_dna: the C++ selective scan is unavailable",
                         instead="Caduceus runs the chunked PyTorch scan instead (slower).")


class SelectiveScanCpu(torch.autograd.Function):
    """x, dt: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,) -> y (b, d, l). Math in float32, or
    float64 for float64 input; gradients come back in each input's dtype."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D):
        math = torch.float64 if x.dtype == torch.float64 else torch.float32
        ctx.dtypes = [t.dtype for t in (x, dt, A, B, C, D)]
        x_, dt_, A_, D_ = (t.to(math).contiguous() for t in (x, dt, A, D))
        B_, C_ = (t.to(math).transpose(1, 2).contiguous() for t in (B, C))
        ctx.save_for_backward(x_, dt_, A_, B_, C_, D_)
        return EXTENSION.load().forward(x_, dt_, A_, B_, C_, D_).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        if torch.is_grad_enabled():  # create_graph: the kernel's gradients would carry no history
            raise RuntimeError("dyt_dna: the C++ selective scan has no double backward (create_graph=True); "
                               "call dyt_dna.scan.scan(..., use_kernel=False) for the chunked PyTorch scan")
        saved = ctx.saved_tensors
        gx, gdt, gA, gB, gC, gD = EXTENSION.load().backward(*saved, gy.to(saved[0].dtype).contiguous())
        grads = (gx, gdt, gA, gB.transpose(1, 2), gC.transpose(1, 2), gD)
        return tuple(g.to(dtype) if needed else None
                     for g, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad))


def available() -> bool:
    """Whether the kernel is built (building it now if needed); a failure warns once."""
    return EXTENSION.build_error() is None


def selective_scan_cpu(x, dt, A, B, C, D) -> torch.Tensor:
    return SelectiveScanCpu.apply(x, dt, A, B, C, D)
