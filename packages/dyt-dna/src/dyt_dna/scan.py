"""Mamba's selective scan: ``mamba_ssm``'s CUDA kernel for CUDA tensors where it is importable, the
C++ kernel of :mod:`dyt_dna.scan_cpu` for CPU tensors where it builds, and otherwise (and as the
readable formulation) this module's pure-PyTorch scan, parallel within chunks (no Python loop per
time step).

The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t + D x_t is solved in
closed form inside each chunk of T steps: with S_t the cumulative log decay since the chunk start,
h_t = exp(S_t) (h_start + sum_{s<=t} exp(-S_s) u_s) — two cumsums. Only the chunk-end states are
carried from chunk to chunk (a loop over L / T chunks on (b, d, n) tensors).

exp(-S_s) grows inside a chunk, so that part runs in float64, and a per-step log decay is floored
at -700 / T: a decay below e^-43 per step (T = 16) already zeroes the state in any float32 result.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from . import scan_cpu

CHUNK = 16


def selective_scan(x, dt, A, B, C, D, chunk: int = CHUNK) -> torch.Tensor:
    """x, dt: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,) -> y (b, d, l). dt already positive."""
    length = x.shape[-1]
    pad = (-length) % chunk  # padded steps have dt = 0: no decay, no input
    xp, dtp, Bp = (F.pad(t.float(), (0, pad)) for t in (x, dt, B))
    log_decay = einsum(dtp, A.float(), "b d l, d n -> b d n l").double().clamp_min(-700 / chunk)
    u = einsum(dtp * xp, Bp, "b d l, b n l -> b d n l").double()
    log_decay, u = (rearrange(t, "b d n (c t) -> b d n c t", t=chunk) for t in (log_decay, u))
    S = torch.cumsum(log_decay, dim=-1)
    decay = torch.exp(S)
    local = decay * torch.cumsum(torch.exp(-S) * u, dim=-1)  # state if the chunk started from zero
    state = u.new_zeros(u.shape[:3])
    entering = []
    for end_decay, end_state in zip(decay[..., -1].unbind(-1), local[..., -1].unbind(-1)):
        entering.append(state)
        state = end_decay * state + end_state
    h = local + decay * torch.stack(entering, dim=-1)[..., None]
    h = rearrange(h, "b d n c t -> b d n (c t)")[..., :length].float()
    y = einsum(h, C.float(), "b d n l, b n l -> b d l") + D.float()[:, None] * x.float()
    return y.to(x.dtype)


def selective_scan_reference(x, dt, A, B, C, D) -> torch.Tensor:
    """The recurrence one step at a time: the ground truth for tests and the speed baseline."""
    decay = torch.exp(einsum(dt, A, "b d l, d n -> l b d n"))
    u = einsum(dt * x, B, "b d l, b n l -> l b d n")
    h = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    ys = []
    for a_t, u_t, c_t in zip(decay, u, rearrange(C, "b n l -> l b n")):
        h = a_t * h + u_t
        ys.append(einsum(h, c_t, "b d n, b n -> b d"))
    return torch.stack(ys, dim=-1) + D[:, None] * x


@functools.cache  # a failed import is not cached by Python: it would be tried again at every scan
def _cuda_kernel():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        print("warning: mamba_ssm is not installed: Caduceus scans CUDA tensors with the chunked PyTorch scan "
              "(float64 inside a chunk; far slower and larger than Mamba's kernel): pip install mamba-ssm",
              file=sys.stderr, flush=True)
        return None
    return selective_scan_fn


def scan(x, dt_raw, dt_bias, A, B, C, D, use_kernel: bool = True) -> torch.Tensor:
    """The scan Mamba blocks call: dt = softplus(dt_raw + dt_bias); a kernel when one is usable."""
    if use_kernel and x.is_cuda:
        kernel = _cuda_kernel()
        if kernel is not None:
            # the kernel takes A, D and the bias in float32 only (under bf16 DeepSpeed casts A_log too)
            return kernel(x, dt_raw, A.float(), B, C, D.float(), delta_bias=dt_bias.float(), delta_softplus=True)
    math = torch.promote_types(dt_raw.dtype, torch.float32)  # as the kernel: in bf16 dt_bias ~ -6.9 is off by 0.03
    dt = F.softplus(dt_raw.to(math) + dt_bias.to(math)[:, None])
    if use_kernel and x.device.type == "cpu" and scan_cpu.available():
        return scan_cpu.selective_scan_cpu(x, dt, A, B, C, D)
    return selective_scan(x, dt, A, B, C, D)
