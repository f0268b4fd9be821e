"""The fused backend: Triton kernels for DyT and for residual-add + DyT.

Forward: one pass (read x, write y). Backward: one pass over x and dy that writes dx and keeps
per-program partials of d weight, d bias and d alpha in 2-D register tiles, reduced once at the end
of each program; a tiny torch reduction over programs finishes them. Math and partials are float32
for half, bfloat16 and float32 input, float64 for float64 input. So the backward
moves the memory floor (read x, dy; write dx) plus O(programs x channels) partials.

Kernels take a 2-D ``(rows, channels)`` view whose last dim is contiguous (any row stride). Import
this module only where Triton can run: on CUDA, or on CPU with ``TRITON_INTERPRET=1`` set before
the import (Triton's interpreter, for tests: slow, small shapes).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import autograd_functions
from .compiled import SATURATED

_SATURATED = tl.constexpr(SATURATED)


@triton.jit
def _tanh(y, EXP_ONLY: tl.constexpr):
    # Same formulation as the compiled backend: odd Taylor polynomial near 0, exp form elsewhere
    # (within 2 ulp of float32 tanh), with no dependence on a libdevice tanh. In float64
    # (EXP_ONLY) the polynomial's 1e-8 truncation would show, so the exp form runs everywhere: its
    # absolute error stays at float64 rounding.
    ay = tl.abs(y)
    ay = tl.where(ay > _SATURATED, _SATURATED, ay)  # tanh is +-1 there; keeps exp(-2|y|) out of
    # subnormals. (A where, unlike tl.minimum's default, lets NaN through.)
    e = tl.exp(-2.0 * ay)
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(y < 0, -large, large)
    y2 = y * y
    p = y2 * (21844.0 / 6081075.0) - 1382.0 / 155925.0
    p = p * y2 + 62.0 / 2835.0
    p = p * y2 - 17.0 / 315.0
    p = p * y2 + 2.0 / 15.0
    p = p * y2 - 1.0 / 3.0
    if EXP_ONLY:
        return large
    return tl.where(ay < 0.4, y + y * y2 * p, large)


@triton.jit
def _forward_kernel(
    x_ptr, r_ptr, s_ptr, y_ptr, alpha_ptr, w_ptr, b_ptr,
    rows, cols, stride_x, stride_r, stride_s, stride_y,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < cols
    mask = mask_m[:, None] & mask_n[None, :]
    alpha = tl.load(alpha_ptr).to(COMPUTE)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(COMPUTE)
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_n[None, :], mask=mask, other=0.0).to(COMPUTE)
    if HAS_RESIDUAL:
        x += tl.load(r_ptr + offs_m[:, None] * stride_r + offs_n[None, :], mask=mask, other=0.0).to(COMPUTE)
        tl.store(s_ptr + offs_m[:, None] * stride_s + offs_n[None, :], x.to(s_ptr.dtype.element_ty), mask=mask)
    y = w[None, :] * _tanh(alpha * x, COMPUTE == tl.float64)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(COMPUTE)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    x_ptr, dy_ptr, ds_ptr, dx_ptr, alpha_ptr, w_ptr,
    dw_part_ptr, db_part_ptr, da_part_ptr,
    rows, cols, stride_x, stride_dy, stride_ds, stride_dx,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ITERS: tl.constexpr, COMPUTE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < cols
    alpha = tl.load(alpha_ptr).to(COMPUTE)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(COMPUTE)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    da_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    row_start = pid_m * ITERS * BLOCK_M
    for step in range(ITERS):
        offs_m = row_start + step * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m < rows)[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_n[None, :], mask=mask, other=0.0).to(COMPUTE)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dy + offs_n[None, :], mask=mask, other=0.0).to(COMPUTE)
        t = _tanh(alpha * x, COMPUTE == tl.float64)
        g = dy * w[None, :] * (1.0 - t * t)
        dx = g * alpha
        if HAS_RESIDUAL_GRAD:
            dx += tl.load(ds_ptr + offs_m[:, None] * stride_ds + offs_n[None, :], mask=mask, other=0.0).to(COMPUTE)
        tl.store(dx_ptr + offs_m[:, None] * stride_dx + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * t
        if HAS_BIAS:
            db_acc += dy
        da_acc += g * x
    tl.store(dw_part_ptr + pid_m * cols + offs_n, tl.sum(dw_acc, axis=0), mask=mask_n)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid_m * cols + offs_n, tl.sum(db_acc, axis=0), mask=mask_n)
    tl.store(da_part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(da_acc, axis=1), axis=0))


@functools.cache
def _tiles(cols: int, element_size: int, device_type: str) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) per channel count and dtype: a tile of ~16 KB of input per
    program keeps enough bytes in flight without spilling registers."""
    block_n = min(triton.next_power_of_2(cols), 1024 if element_size >= 4 else 2048)
    block_m = max(1, min(64, 16384 // (block_n * element_size)))
    num_warps = 8 if block_n * block_m >= 4096 else 4
    if device_type == "cpu":  # interpreter: small tiles keep it quick
        block_n, block_m, num_warps = min(block_n, 256), min(block_m, 4), 1
    return block_m, block_n, num_warps


@functools.cache
def _row_programs(device: torch.device) -> int:
    """Programs along rows in the backward: a few per SM, so partials stay small."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _compute_dtype(x: torch.Tensor):
    """float64 math for float64 input (as every backend promises); float32 for the rest."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_forward(x, alpha, weight, bias, residual=None):
    """y (and s = x + residual when given), from a 2-D ``(rows, channels)`` input."""
    x = _as_rows(x)
    rows, cols = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = None
    if residual is not None:
        residual = _as_rows(residual)
        s = torch.empty_like(y)
    block_m, block_n, warps = _tiles(cols, x.element_size(), x.device.type)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _forward_kernel[grid](
        x, residual if residual is not None else x, s if s is not None else y, y, alpha, weight,
        bias if bias is not None else weight,
        rows, cols, x.stride(0), residual.stride(0) if residual is not None else 0,
        s.stride(0) if s is not None else 0, y.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, COMPUTE=_compute_dtype(x), num_warps=warps,
    )
    return y, s


def fused_backward(dy, x, alpha, weight, has_bias, ds=None):
    """(dx, dalpha, dweight, dbias) for y = DyT(x); with ``ds``, dx also carries the gradient
    arriving at s = x + residual (the residual-add op's second output)."""
    dy, x = _as_rows(dy), _as_rows(x)
    rows, cols = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_m, block_n, warps = _tiles(cols, x.element_size(), x.device.type)
    # Row blocks per program, rounded up to a power of two: a compile-time loop count with few
    # distinct values (one kernel variant per bucket, not per row count).
    target = max(1, min(_row_programs(x.device), triton.cdiv(rows, block_m)))
    iters = triton.next_power_of_2(triton.cdiv(triton.cdiv(rows, target), block_m))
    programs = triton.cdiv(rows, iters * block_m)
    col_blocks = triton.cdiv(cols, block_n)
    partial = {"device": x.device, "dtype": torch.float64 if x.dtype == torch.float64 else torch.float32}
    dw_part = torch.empty(programs, cols, **partial)
    db_part = torch.empty(programs, cols, **partial) if has_bias else dw_part
    da_part = torch.empty(programs, col_blocks, **partial)
    if ds is not None:
        ds = _as_rows(ds)
    _backward_kernel[(programs, col_blocks)](
        x, dy, ds if ds is not None else dy, dx, alpha, weight, dw_part, db_part, da_part,
        rows, cols, x.stride(0), dy.stride(0), ds.stride(0) if ds is not None else 0, dx.stride(0),
        HAS_BIAS=has_bias, HAS_RESIDUAL_GRAD=ds is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, ITERS=iters, COMPUTE=_compute_dtype(x), num_warps=warps,
    )
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(weight.dtype) if has_bias else None
    dalpha = da_part.sum().reshape(alpha.shape).to(alpha.dtype)
    return dx, dalpha, dweight, dbias


FusedDyTFunction, FusedResidualDyTFunction = autograd_functions(fused_forward, fused_backward)


def dyt_fused(x, alpha, weight, bias, reduce_dims):
    """Fused DyT on the canonical layout (see :mod:`dyt.kernels`); channels-first input is
    transposed to channels-last (a copy) because the kernels stream rows of channels."""
    if x.ndim == 3:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        y = FusedDyTFunction.apply(rows, alpha, weight.reshape(-1), None if bias is None else bias.reshape(-1))
        return y.reshape(x.shape[0], x.shape[2], x.shape[1]).movedim(-1, 1)
    return FusedDyTFunction.apply(x, alpha, weight, bias)
