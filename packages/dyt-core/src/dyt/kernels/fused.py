"""The fused backend: Triton kernels for DyT and for residual-add + DyT.

Forward: one pass (read x, write y). Backward: one pass over x and dy that writes dx and keeps
per-program partials of d weight, d bias and d alpha in register tiles, reduced once at the end
of each program; a tiny torch reduction over programs finishes them. Math and partials are float32
for half, bfloat16 and float32 input, float64 for float64 input. So the backward
moves the memory floor (read x, dy; write dx) plus O(programs x channels) partials.

Both passes are memory-bound only if the math per element stays short: tanh takes the exp form
alone wherever the output's rounding exceeds its error (half dtypes; float64 math), and the float32
path adds the polynomial near 0 that keeps it within 2 ulp. The backward's
row loop has a run-time bound, so the compiler cannot unroll it into hundreds of live registers.
Tile sizes per pass: :data:`FORWARD_TILE`, :data:`BACKWARD_TILE` (measured: docs/performance.md,
``scripts/tune_fused_tiles.py``).

Kernels take a 2-D ``(rows, channels)`` view whose last dim is contiguous (any row stride). Import
this module only where Triton can run: on CUDA, or on CPU with ``TRITON_INTERPRET=1`` set before
the import (Triton's interpreter, for tests: slow, small shapes).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from . import autograd_functions, compute_dtype, in_layout_of
from .compiled import SATURATED

_SATURATED = tl.constexpr(SATURATED)


TANH_FLOAT32, TANH_FLOAT64, TANH_HALF = 0, 1, 2
"""``_tanh``'s modes: float32 math for float32 output; float64 math; float32 math for half and
bfloat16 output."""
_TANH_FLOAT64, _TANH_HALF = tl.constexpr(TANH_FLOAT64), tl.constexpr(TANH_HALF)  # as the kernels read them


@triton.jit
def _tanh(y, MODE: tl.constexpr):
    # Same formulation as the compiled backend: odd Taylor polynomial near 0, exp form elsewhere
    # (within 2 ulp of float32 tanh), with no dependence on a libdevice tanh. The exp form alone
    # cancels near 0 (relative error ~eps / |y|), so each mode keeps something else there:
    # TANH_FLOAT32 the polynomial below 0.4; TANH_FLOAT64 the polynomial below 2^-10 (its float32
    # literals' rounding adds ~2e-8 y^2 relative, 2e-14 there; the exp form's is 1.1e-16 / 2|y|,
    # 6e-14 there, and the truncation at 0.4 would show, 2e-8); TANH_HALF
    # y itself below 2^-7 (relative error y^2 / 3 < 2e-5; above it the exp form's 1e-7 / |y| is
    # < 1.3e-5; half's rounding is 4.9e-4, bfloat16's 3.9e-3), one select instead of the
    # polynomial's, which takes the bf16 forward from ~30 to ~22 instructions per element (sm_90).
    ay = tl.abs(y)
    ay = tl.where(ay > _SATURATED, _SATURATED, ay)  # tanh is +-1 there; keeps exp(-2|y|) out of
    # subnormals. (A where, unlike tl.minimum's default, lets NaN through.)
    e = tl.exp(-2.0 * ay)
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(y < 0, -large, large)
    if MODE == _TANH_HALF:
        return tl.where(ay < 0.0078125, y, large)
    y2 = y * y
    p = y2 * (21844.0 / 6081075.0) - 1382.0 / 155925.0
    p = p * y2 + 62.0 / 2835.0
    p = p * y2 - 17.0 / 315.0
    p = p * y2 + 2.0 / 15.0
    p = p * y2 - 1.0 / 3.0
    if MODE == _TANH_FLOAT64:
        return tl.where(ay < 0.0009765625, y + y * y2 * p, large)
    return tl.where(ay < 0.4, y + y * y2 * p, large)


@triton.jit
def _load_rows(ptr, offs_m, offs_n, mask, stride):
    return tl.load(ptr + offs_m[:, None] * stride + offs_n[None, :], mask=mask, other=0.0)


@triton.jit
def _forward_kernel(
    x_ptr, r_ptr, s_ptr, y_ptr, alpha_ptr, w_ptr, b_ptr,
    rows, cols, stride_x, stride_r, stride_s, stride_y,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TANH_MODE: tl.constexpr, COMPUTE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row offsets past 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask_n = offs_n < cols
    mask = mask_m[:, None] & mask_n[None, :]
    alpha = tl.load(alpha_ptr).to(COMPUTE)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(COMPUTE)
    x = _load_rows(x_ptr, offs_m, offs_n, mask, stride_x).to(COMPUTE)
    if HAS_RESIDUAL:  # y from s as stored (rounded to its dtype), as the backward reads it back
        s = (x + _load_rows(r_ptr, offs_m, offs_n, mask, stride_r).to(COMPUTE)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs_m[:, None] * stride_s + offs_n[None, :], s, mask=mask)
        x = s.to(COMPUTE)
    y = w[None, :] * _tanh(alpha * x, TANH_MODE)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(COMPUTE)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_block(
    x, dy, ds_ptr, dx_ptr, offs_m, offs_n, mask, alpha, w, dw_acc, db_acc, da_acc, stride_ds, stride_dx,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL_GRAD: tl.constexpr, TANH_MODE: tl.constexpr, COMPUTE: tl.constexpr,
):
    """dx for one loaded block of rows, and the block's terms added to the three accumulators."""
    x = x.to(COMPUTE)
    dy = dy.to(COMPUTE)
    t = _tanh(alpha * x, TANH_MODE)
    g = dy * w[None, :] * (1.0 - t * t)
    dx = g * alpha
    if HAS_RESIDUAL_GRAD:
        dx += _load_rows(ds_ptr, offs_m, offs_n, mask, stride_ds).to(COMPUTE)
    tl.store(dx_ptr + offs_m[:, None] * stride_dx + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    dw_acc += dy * t
    if HAS_BIAS:
        db_acc += dy
    da_acc += g * x
    return dw_acc, db_acc, da_acc


@triton.jit
def _backward_kernel(
    x_ptr, dy_ptr, ds_ptr, dx_ptr, alpha_ptr, w_ptr,
    dw_part_ptr, db_part_ptr, da_part_ptr,
    rows, cols, rows_per_program, stride_x, stride_dy, stride_ds, stride_dx,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr, INTERLEAVE: tl.constexpr, TANH_MODE: tl.constexpr, COMPUTE: tl.constexpr,
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
    # Each program takes rows_per_program rows: one contiguous range, or (INTERLEAVE) the row blocks
    # pid, pid + programs, pid + 2 programs, ..., so the programs running at once read one
    # contiguous slab, as the forward's grid does. The row loop's bound is a run-time value, so it
    # is never unrolled into hundreds of live registers (a while loop: Triton 3.5's interpreter
    # takes no run-time bound in range()). PREFETCH loads the next row block before computing this
    # one, so its loads are in flight during the math and the store.
    if INTERLEAVE:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row offsets past 2**31
        row_end = rows
        row_step = tl.num_programs(0) * BLOCK_M
    else:
        row_start = pid_m.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, rows)
        offs_m = row_start + tl.arange(0, BLOCK_M)
        row_step = BLOCK_M
    mask = (offs_m < row_end)[:, None] & mask_n[None, :]
    if PREFETCH:
        x = _load_rows(x_ptr, offs_m, offs_n, mask, stride_x)
        dy = _load_rows(dy_ptr, offs_m, offs_n, mask, stride_dy)
    step = 0
    while step < rows_per_program:
        next_m = offs_m + row_step
        next_mask = (next_m < row_end)[:, None] & mask_n[None, :]
        if PREFETCH:
            next_x = _load_rows(x_ptr, next_m, offs_n, next_mask, stride_x)
            next_dy = _load_rows(dy_ptr, next_m, offs_n, next_mask, stride_dy)
        else:
            x = _load_rows(x_ptr, offs_m, offs_n, mask, stride_x)
            dy = _load_rows(dy_ptr, offs_m, offs_n, mask, stride_dy)
        dw_acc, db_acc, da_acc = _backward_block(
            x, dy, ds_ptr, dx_ptr, offs_m, offs_n, mask, alpha, w, dw_acc, db_acc, da_acc, stride_ds, stride_dx,
            HAS_BIAS, HAS_RESIDUAL_GRAD, TANH_MODE, COMPUTE)
        if PREFETCH:
            x, dy = next_x, next_dy
        offs_m, mask = next_m, next_mask
        step += BLOCK_M
    tl.store(dw_part_ptr + pid_m * cols + offs_n, tl.sum(dw_acc, axis=0), mask=mask_n)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid_m * cols + offs_n, tl.sum(db_acc, axis=0), mask=mask_n)
    tl.store(da_part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(da_acc, axis=1), axis=0))


# (elements per program, warps) for each pass, and the backward's split of rows: chosen with
# scripts/tune_fused_tiles.py on an H200 (bf16; LLaMA-7B shapes and a 13B-wide one), confirmed on
# held-out shapes (docs/performance.md, "GPU"). The backward keeps three float32 accumulators per
# element of its tile, so its tile is smaller; BACKWARD_PROGRAMS_PER_SM sets how many programs share
# the rows (more: more parallelism, more partials to sum); BACKWARD_PREFETCH loads the next row block
# before computing this one.
FORWARD_TILE = (4096, 8)
BACKWARD_TILE = (2048, 8)
BACKWARD_PROGRAMS_PER_SM = 2
BACKWARD_PREFETCH = True
BACKWARD_INTERLEAVE = False  # a candidate of the sweep, not yet measured on a GPU


@functools.cache
def _tiles(cols: int, element_size: int, device_type: str, tile: tuple[int, int]) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for ``tile = (elements, warps)``: rows of up to 2048 half or
    1024 wider columns, as many rows as fill the tile (at most 64)."""
    elements, warps = tile
    block_n = min(triton.next_power_of_2(cols), elements, 2048 if element_size <= 2 else 1024)
    block_m = max(1, min(64, elements // block_n))
    if device_type == "cpu":  # interpreter: small tiles keep it quick
        block_n, block_m, warps = min(block_n, 256), min(block_m, 4), 1
    return block_m, block_n, warps


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor):
    """float64 math where x or the weight is float64 (:func:`dyt.kernels.compute_dtype`, as every
    backend promises); float32 for the rest."""
    return tl.float64 if compute_dtype(x, weight) == torch.float64 else tl.float32


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _on(device: torch.device):
    """Triton launches on the current CUDA device: the tensor's must be current (``dyt-bench --device
    cuda:1`` otherwise ran cuda:0's kernel on cuda:1's memory); the interpreter's CPU tensors need none."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tanh_mode(x: torch.Tensor, weight: torch.Tensor) -> int:
    """See ``_tanh``."""
    if compute_dtype(x, weight) == torch.float64:
        return TANH_FLOAT64
    return TANH_FLOAT32 if x.dtype == torch.float32 else TANH_HALF


def fused_forward(x, alpha, weight, bias, residual=None, tile=None):
    """y (and s = x + residual when given), from a 2-D ``(rows, channels)`` input. ``tile``
    overrides :data:`FORWARD_TILE` (for the tile sweep)."""
    x = _as_rows(x)
    rows, cols = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = None
    if residual is not None:
        residual = _as_rows(residual)
        s = torch.empty_like(y)
    block_m, block_n, warps = _tiles(cols, x.element_size(), x.device.type, tile or FORWARD_TILE)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    with _on(x.device):
        _forward_kernel[grid](
            x, residual if residual is not None else x, s if s is not None else y, y, alpha, weight,
            bias if bias is not None else weight,
            rows, cols, x.stride(0), residual.stride(0) if residual is not None else 0,
            s.stride(0) if s is not None else 0, y.stride(0),
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, TANH_MODE=_tanh_mode(x, weight), COMPUTE=_compute_dtype(x, weight), num_warps=warps,
        )
    return y, s


def fused_backward(dy, x, alpha, weight, has_bias, ds=None, tile=None, programs_per_sm=None, prefetch=None,
                   interleave=None):
    """(dx, dalpha, dweight, dbias) for y = DyT(x); with ``ds``, dx also carries the gradient
    arriving at s = x + residual (the residual-add op's second output). ``tile``, ``programs_per_sm``,
    ``prefetch`` and ``interleave`` override :data:`BACKWARD_TILE`, :data:`BACKWARD_PROGRAMS_PER_SM`,
    :data:`BACKWARD_PREFETCH` and :data:`BACKWARD_INTERLEAVE` (for the tile sweep)."""
    dy, x = _as_rows(dy), _as_rows(x)
    rows, cols = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_m, block_n, warps = _tiles(cols, x.element_size(), x.device.type, tile or BACKWARD_TILE)
    # A few programs per multiprocessor share the rows, in whole row blocks: the loop bound is a
    # run-time argument, so no row count compiles a new kernel variant.
    target = (programs_per_sm or BACKWARD_PROGRAMS_PER_SM) * _multiprocessors(x.device)
    target = max(1, min(target, triton.cdiv(rows, block_m)))
    rows_per_program = max(1, triton.cdiv(triton.cdiv(rows, target), block_m)) * block_m
    programs = max(1, triton.cdiv(rows, rows_per_program))
    col_blocks = triton.cdiv(cols, block_n)
    partial = {"device": x.device, "dtype": compute_dtype(x, weight)}
    dw_part = torch.empty(programs, cols, **partial)
    db_part = torch.empty(programs, cols, **partial) if has_bias else dw_part
    da_part = torch.empty(programs, col_blocks, **partial)
    if ds is not None:
        ds = _as_rows(ds)
    with _on(x.device):
        _backward_kernel[(programs, col_blocks)](
            x, dy, ds if ds is not None else dy, dx, alpha, weight, dw_part, db_part, da_part,
            rows, cols, rows_per_program,
            x.stride(0), dy.stride(0), ds.stride(0) if ds is not None else 0, dx.stride(0),
            HAS_BIAS=has_bias, HAS_RESIDUAL_GRAD=ds is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            PREFETCH=BACKWARD_PREFETCH if prefetch is None else prefetch,
            INTERLEAVE=BACKWARD_INTERLEAVE if interleave is None else interleave,
            TANH_MODE=_tanh_mode(x, weight), COMPUTE=_compute_dtype(x, weight), num_warps=warps,
        )
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(weight.dtype) if has_bias else None
    dalpha = da_part.sum().reshape(alpha.shape).to(alpha.dtype)
    return dx, dalpha, dweight, dbias


FusedDyTFunction, FusedResidualDyTFunction = autograd_functions(fused_forward, fused_backward)


def dyt_fused(x, alpha, weight, bias, reduce_dims):
    """Fused DyT on the canonical layout (see :mod:`dyt.kernels`); channels-first input is
    transposed to channels-last (a copy) because the kernels stream rows of channels, and the result
    comes back in the input's layout (:func:`~dyt.kernels.in_layout_of`)."""
    if x.ndim == 3:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        y = FusedDyTFunction.apply(rows, alpha, weight.reshape(-1), None if bias is None else bias.reshape(-1))
        return in_layout_of(x, y.reshape(x.shape[0], x.shape[2], x.shape[1]).movedim(-1, 1))
    return FusedDyTFunction.apply(x, alpha, weight, bias)
