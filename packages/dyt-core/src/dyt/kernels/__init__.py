"""Kernel layer: DyT forward/backward implementations, one module per backend.

Every kernel takes the canonical layout prepared by :mod:`dyt.functional`:
``x`` is 2-D ``(rows, channels)`` with ``weight``/``bias`` of shape ``(channels,)``, or 3-D
``(batch, channels, length)`` with ``weight``/``bias`` of shape ``(channels, 1)``; ``reduce_dims``
names the dimensions a parameter gradient sums over. Kernels know nothing of modules or recipes.
Math runs in float32 (or float64 when inputs are float64); outputs keep the input's dtype.
"""

import torch


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype DyT math runs in: at least float32, float64 if either operand is float64."""
    return torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)


def in_layout_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y``, a channels-first kernel's result transposed back from its rows of channels, in the
    layout eager's elementwise ops give for ``x``: contiguous for contiguous ``x`` (a copy), else as
    it comes (it then has ``x``'s strides, e.g. an image batch stored channels-last)."""
    return y.contiguous() if x.is_contiguous() else y


def differentiable_backward(dy, x, alpha, weight, has_bias, ds=None):
    """(dx, dalpha, dweight, dbias) for 2-D ``(rows, channels)`` x in torch ops, which autograd records:
    what a fused backend's backward runs under ``create_graph`` (double backward), where its kernels'
    gradients, carrying no history, would make a second backward silently leave DyT out. The cpu
    backend's C++ autograd functions run the same formula (``differentiable_backward`` in
    csrc/dyt_cpu.cpp)."""
    ct = compute_dtype(x, weight)
    xc, dyc, a, w = x.to(ct), dy.to(ct), alpha.to(ct), weight.to(ct)
    t = torch.tanh(a * xc)
    g = dyc * w * (1 - t * t)
    dx = g * a if ds is None else g * a + ds.to(ct)
    return (dx.to(x.dtype), (g * xc).sum().reshape(alpha.shape).to(alpha.dtype), (dyc * t).sum(0).to(weight.dtype),
            dyc.sum(0).to(weight.dtype) if has_bias else None)


def autograd_functions(forward, backward) -> tuple[type[torch.autograd.Function], type[torch.autograd.Function]]:
    """The autograd wrappers of a fused backend's kernels: ``(DyT, residual DyT)`` functions.

    ``forward(x, alpha, weight, bias, residual=None) -> (y, s)`` and ``backward(dy, x, alpha, weight,
    has_bias, ds=None) -> (dx, dalpha, dweight, dbias)``; the residual function returns
    ``(s, y) = (x + residual, DyT(x + residual))`` in one pass each way."""

    class DyTFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, alpha, weight, bias):
            y, _ = forward(x, alpha, weight, bias)
            ctx.save_for_backward(x, alpha, weight)
            ctx.has_bias = bias is not None
            return y

        @staticmethod
        def backward(ctx, dy):
            x, alpha, weight = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph: gradients that are themselves differentiable
                return differentiable_backward(dy, x, alpha, weight, ctx.has_bias)
            return backward(dy.contiguous(), x, alpha, weight, ctx.has_bias)

    class ResidualDyTFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, residual, alpha, weight, bias):
            y, s = forward(x, alpha, weight, bias, residual=residual)
            ctx.set_materialize_grads(False)  # an unused s or y arrives as None, not as zeros to run a kernel on
            ctx.save_for_backward(s, alpha, weight)
            ctx.has_bias = bias is not None
            return s, y

        @staticmethod
        def backward(ctx, ds, dy):
            s, alpha, weight = ctx.saved_tensors
            if dy is None:
                return ds, ds, None, None, None
            if torch.is_grad_enabled():  # create_graph: gradients that are themselves differentiable
                dx, dalpha, dweight, dbias = differentiable_backward(dy, s, alpha, weight, ctx.has_bias, ds)
                return dx, dx, dalpha, dweight, dbias
            dx, dalpha, dweight, dbias = backward(dy.contiguous(), s, alpha, weight, ctx.has_bias,
                                                  ds=None if ds is None else ds.contiguous())
            return dx, dx, dalpha, dweight, dbias

    return DyTFunction, ResidualDyTFunction
