"""The compiled backend: an autograd.Function whose forward and backward are separately compiled
with ``torch.compile(dynamic=True)`` (inductor: C++/OpenMP on CPU, Triton on CUDA).

Why not just ``torch.compile`` the eager formula? Measured on a 2-core CPU (see docs/performance.md),
the autograd graph inductor derives saves ``tanh(alpha x)`` (an extra activation-sized buffer) and
emits its per-channel gradient sums as column-strided loops, ending 1.8-1.9x slower than LayerNorm
forward+backward. Here:

* the forward saves only its inputs and recomputes ``tanh`` in the backward (tanh is cheap next to
  a fresh activation-sized allocation, whose page faults dominate on CPU);
* the backward first writes ``dy * tanh(alpha x)`` into the buffer that will become ``dx``, sums it
  (and ``dy``) over rows with ATen's well-vectorised reductions, then overwrites the same buffer
  with ``dx`` in place, so the backward allocates one activation-sized tensor, like LayerNorm's.

Shapes are dynamic: new sequence lengths do not recompile.

Every squash function of :data:`dyt.kernels.eager.SQUASHES` and a per-channel alpha run here too
(the paper's ablations): the same kernels with ``f`` and its slope swapped in, one compiled copy per
(squash, alpha layout); with a per-channel alpha the alpha gradient is summed like the weight's.
"""

import functools
import types

import torch

from . import compute_dtype
from .eager import check_squash

SATURATED = 20.0
"""|y| beyond which tanh(y) rounds to +-1 even in float64 (1 - tanh(20) = 8.5e-18)."""


def _tanh(y):
    """tanh within 2 ulp of float32, built from ops inductor vectorises cheaply on CPU (measured
    ~35% faster there than its tanh): an odd Taylor polynomial through y^13 for |y| < 0.4
    (truncation < 1e-8 relative), (1 - e) / (1 + e) with e = exp(-2|y|) elsewhere.

    |y| is clamped at SATURATED first: for |y| in (43.6, 51.9) exp(-2|y|) is a float32 subnormal,
    and subnormal arithmetic on x86 CPUs made the backward 1.5x slower on saturated inputs.

    float64 input takes torch.tanh: the polynomial's 1e-8 truncation would show there, and float64
    callers want float64 accuracy, not speed (dtypes are static under torch.compile)."""
    if y.dtype == torch.float64:
        return torch.tanh(y)
    ay = y.abs().clamp(max=SATURATED)
    e = torch.exp(-2 * ay)
    large = torch.copysign((1 - e) / (1 + e), y)
    y2 = y * y
    p = y2 * (21844 / 6081075) - 1382 / 155925
    p = p * y2 + 62 / 2835
    p = p * y2 - 17 / 315
    p = p * y2 + 2 / 15
    p = p * y2 - 1 / 3
    return torch.where(ay < 0.4, y + y * y2 * p, large)


def _squash(y, squash):
    """f(y) for DyT's squash function ``squash`` (a constant per compiled copy)."""
    if squash == "tanh":
        return _tanh(y)
    if squash == "hardtanh":
        return y.clamp(-1.0, 1.0)
    if squash == "sigmoid":
        return torch.sigmoid(y)
    return y


def _squash_slope(y, t, squash):
    """f'(y), given t = f(y). hardtanh: 1 strictly inside (-1, 1), as torch's hardtanh backward."""
    if squash == "tanh":
        return 1 - t * t
    if squash == "hardtanh":
        return ((y > -1.0) & (y < 1.0)).to(y.dtype)
    if squash == "sigmoid":
        return t * (1 - t)
    return torch.ones_like(y)


def _forward_with_bias(x, alpha, weight, bias, squash, channel_alpha):
    ct = compute_dtype(x, weight)
    return (weight.to(ct) * _squash(alpha.to(ct) * x.to(ct), squash) + bias.to(ct)).to(x.dtype)


def _forward_no_bias(x, alpha, weight, squash, channel_alpha):
    ct = compute_dtype(x, weight)
    return (weight.to(ct) * _squash(alpha.to(ct) * x.to(ct), squash)).to(x.dtype)


def _dy_times_squash(dy, x, alpha, weight, squash, channel_alpha):
    """dy * f(alpha x) in compute dtype: summed over rows it is the weight gradient."""
    ct = compute_dtype(x, weight)
    return dy.to(ct) * _squash(alpha.to(ct) * x.to(ct), squash)


def _dx_and_alpha_partials(dy, x, alpha, weight, squash, channel_alpha):
    """dx in compute dtype, and partials of dalpha = sum(dy * weight * f'(alpha x) * x). A scalar
    alpha: per-row partials over the last dim, sharing dx's loop nest (inductor emits one pass). A
    per-channel alpha: the elementwise terms, summed over rows by the caller like the weight's."""
    ct = compute_dtype(x, weight)
    xc, a = x.to(ct), alpha.to(ct)
    y = a * xc
    g = dy.to(ct) * weight.to(ct) * _squash_slope(y, _squash(y, squash), squash)
    return g * a, (g * xc if channel_alpha else (g * xc).sum(-1))


def _input_grad(dy, x, alpha, weight, squash, channel_alpha):
    dx, partials = _dx_and_alpha_partials(dy, x, alpha, weight, squash, channel_alpha)
    return dx.to(x.dtype), partials


def _input_grad_into(out, dy, x, alpha, weight, squash, channel_alpha):
    """Like _input_grad, writing dx into ``out`` (same shape and dtype as x); returns the partials."""
    dx, partials = _dx_and_alpha_partials(dy, x, alpha, weight, squash, channel_alpha)
    out.copy_(dx.to(out.dtype))
    return partials


@functools.cache
def _compiled_for(fn, x_dtype: torch.dtype, w_dtype: torch.dtype, ndim: int, squash: str, channel_alpha: bool):
    """One torch.compile cache per (function, dtypes, layout, squash, alpha layout). Dynamo's
    recompile limit counts per code object, so each variant gets its own copy of the code instead
    of evicting the others (``squash`` and ``channel_alpha`` are constants within a copy)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
    return torch.compile(copy, dynamic=True, options={"realize_opcount_threshold": 1000})


def _compiled(fn, x: torch.Tensor, weight: torch.Tensor, squash: str, channel_alpha: bool):
    return _compiled_for(fn, x.dtype, weight.dtype, x.ndim, squash, channel_alpha)


def _compiled_forward(x, alpha, weight, bias, squash, channel_alpha):
    if bias is None:
        return _compiled(_forward_no_bias, x, weight, squash, channel_alpha)(x, alpha, weight, squash, channel_alpha)
    fn = _compiled(_forward_with_bias, x, weight, squash, channel_alpha)
    return fn(x, alpha, weight, bias, squash, channel_alpha)


class CompiledDyTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, weight, bias, reduce_dims, squash="tanh"):
        ctx.save_for_backward(x, alpha, weight)
        ctx.reduce_dims = reduce_dims
        ctx.has_bias = bias is not None
        ctx.variant = (squash, alpha.numel() != 1)
        return _compiled_forward(x, alpha, weight, bias, *ctx.variant)

    @staticmethod
    def backward(ctx, dy):
        x, alpha, weight = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_alpha, need_weight, need_bias = ctx.needs_input_grad[:4]
        dims, variant = ctx.reduce_dims, ctx.variant
        dweight = dbias = None
        if need_bias and ctx.has_bias:
            dbias = dy.sum(dims, dtype=compute_dtype(x, weight)).reshape(weight.shape).to(weight.dtype)
        if need_weight:
            buffer = _compiled(_dy_times_squash, x, weight, *variant)(dy, x, alpha, weight, *variant)
            dweight = buffer.sum(dims).reshape(weight.shape).to(weight.dtype)
            if buffer.dtype == x.dtype and (need_x or need_alpha):
                dalpha = _compiled(_input_grad_into, x, weight, *variant)(buffer, dy, x, alpha, weight, *variant)
                dx = buffer
                return _finish(dx, dalpha, alpha, dweight, dbias, need_x, need_alpha, dims)
        if not (need_x or need_alpha):
            return None, None, dweight, dbias, None, None
        dx, dalpha = _compiled(_input_grad, x, weight, *variant)(dy, x, alpha, weight, *variant)
        return _finish(dx, dalpha, alpha, dweight, dbias, need_x, need_alpha, dims)


def _finish(dx, dalpha_partials, alpha, dweight, dbias, need_x, need_alpha, dims):
    dalpha = None
    if need_alpha:
        total = dalpha_partials.sum() if alpha.numel() == 1 else dalpha_partials.sum(dims)
        dalpha = total.reshape(alpha.shape).to(alpha.dtype)
    return dx if need_x else None, dalpha, dweight, dbias, None, None


def dyt_compiled(x, alpha, weight, bias, reduce_dims, squash="tanh"):
    """Compiled DyT on the canonical layout (see :mod:`dyt.kernels`); ``squash`` one of
    :data:`dyt.kernels.eager.SQUASHES`, ``alpha`` one element or shaped like ``weight``."""
    check_squash(squash)
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, alpha, weight, bias)
    ):
        return _compiled_forward(x, alpha, weight, bias, squash, alpha.numel() != 1)
    return CompiledDyTFunction.apply(x, alpha, weight, bias, reduce_dims, squash)
