"""Functional DyT: validates shapes, brings inputs to the kernels' canonical layout, dispatches."""

from __future__ import annotations

import math
import warnings

import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode, is_traceable_wrapper_subclass

from .backends import BACKENDS, check_backend_name, select_backend
from .kernels.eager import check_squash, dyt_eager


def _plain_formula_needed() -> bool:
    """Where only the eager formula is right, whatever the backend: inside torch.compile (it fuses the
    formula itself); under ``make_fx`` or any other dispatch mode, which never see a C++ kernel write
    through a data pointer, so a traced graph returned uninitialised memory (``torch.jit.trace`` is
    met before this, in :func:`dyt` and :func:`residual_dyt`); under a ``torch.func`` transform (vmap,
    grad, jacrev: no C++ or ctx-less autograd Function runs there); in forward-mode AD (no backend
    but eager defines a jvp)."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0)


def _check_trailing(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Channels-last DyT needs x's trailing dims to be weight's shape (never a silent reshape)."""
    if tuple(x.shape[x.ndim - weight.ndim :]) != tuple(weight.shape):
        raise ValueError(f"DyT over trailing dims {tuple(weight.shape)} got input of shape {tuple(x.shape)}")


def _check_channels_first(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.ndim != 1 or x.ndim < 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"channels-first DyT with {weight.numel()} channels got input of shape {tuple(x.shape)}")


def _shape_checks_fixed_by_the_trace() -> warnings.catch_warnings:
    """Under ``torch.jit.trace`` every size is a tensor, so each shape check of DyT warned
    (TracerWarning) that its answer is fixed in the trace. It is meant to be: they read the
    parameters' shapes, which a traced module keeps, and the input's trailing dims, which its weight
    fixes. Only DyT's own checks run inside, so the caller's code still warns."""
    return warnings.catch_warnings(action="ignore", category=torch.jit.TracerWarning)


def _wrapper_subclass(x: torch.Tensor) -> bool:
    """A DTensor or another wrapper subclass (checked for ``x`` alone: its parameters follow it)."""
    return type(x) is not torch.Tensor and is_traceable_wrapper_subclass(x)


def _broadcast_formula(x, alpha, weight, bias, channels_last: bool, squash: str) -> torch.Tensor:
    """The eager formula on ``x``'s own shape, the parameters broadcast over it: for a tensor subclass
    (a DTensor of tensor or sequence parallelism: reshaping it to rows of channels, as the kernels
    need, fails its sharding, and no C++ kernel sees a subclass's local shards), and under
    ``torch.jit.trace`` (a channels-last trace then takes inputs of any rank)."""
    if channels_last:
        _check_trailing(x, weight)
    else:
        _check_channels_first(x, weight)
        view = (weight.shape[0],) + (1,) * (x.ndim - 2)
        weight, bias = weight.reshape(view), None if bias is None else bias.reshape(view)
        alpha = alpha.reshape(view) if alpha.numel() != 1 else alpha
    return dyt_eager(x, alpha, weight, bias, squash)


def _check_operands(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """What every backend assumes: floating-point tensors (an integer input would come back as
    rounded zeros from eager, and fail inside a kernel elsewhere) and a bias shaped like weight."""
    if not (isinstance(x, torch.Tensor) and isinstance(alpha, torch.Tensor) and isinstance(weight, torch.Tensor)):
        raise TypeError(f"DyT takes tensors for x, alpha and weight, got {type(x).__name__}, "
                        f"{type(alpha).__name__} and {type(weight).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"DyT needs a floating-point input, got {x.dtype}")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"bias shape {tuple(bias.shape)} differs from weight shape {tuple(weight.shape)}")


def dyt(
    x: torch.Tensor,
    alpha: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    channels_last: bool = True,
    backend: str | None = None,
    squash: str = "tanh",
) -> torch.Tensor:
    """Dynamic Tanh: ``weight * tanh(alpha * x) + bias`` (``tanh`` or another ``squash``).

    Args:
        x: input. With ``channels_last`` its trailing dims equal ``weight.shape``; otherwise it is
            ``(batch, channels, ...)`` and ``weight`` is ``(channels,)``.
        alpha: the learnable scalar, a 1-element tensor; or one alpha per channel, shaped like ``weight``.
        weight, bias: per-channel affine parameters (``bias`` may be None).
        backend: ``eager``, ``compiled``, ``fused``, ``cpu``, ``auto``, or None for the process default.
        squash: ``tanh`` (DyT), or an ablation of the paper: ``hardtanh``, ``sigmoid``, ``identity``
            (see :data:`dyt.kernels.eager.SQUASHES`). The fused and cpu backends run tanh with a
            scalar alpha only; ``auto`` then picks compiled or eager.

    Math runs in float32 (float64 for float64 inputs); the result has ``x``'s dtype.
    """
    check_squash(squash)
    if torch._C._is_tracing():
        with _shape_checks_fixed_by_the_trace():
            _check_operands(x, alpha, weight, bias)
            return _broadcast_formula(x, alpha, weight, bias, channels_last, squash)
    _check_operands(x, alpha, weight, bias)
    channel_alpha = alpha.numel() != 1
    if channel_alpha and alpha.shape != weight.shape:
        raise ValueError(f"alpha must have one element or weight's shape {tuple(weight.shape)}, got {tuple(alpha.shape)}")
    if type(x) is not torch.Tensor and is_traceable_wrapper_subclass(x):  # a DTensor
        if backend is not None:
            check_backend_name(backend)
        return _broadcast_formula(x, alpha, weight, bias, channels_last, squash)
    if channels_last:
        _check_trailing(x, weight)
        channels = weight.numel()
        # Reshape only what is not already canonical: each view is an autograd node, and at the
        # tiny LLaMA's sizes the per-call overhead is what separates DyT from LayerNorm.
        canonical = x if x.ndim == 2 and weight.ndim == 1 else x.reshape(-1, channels)
        w = weight if weight.ndim == 1 else weight.reshape(channels)
        b = bias if bias is None or bias.ndim == 1 else bias.reshape(channels)
        a = alpha.reshape(channels) if channel_alpha and alpha.ndim != 1 else alpha
        reduce_dims: tuple[int, ...] = (0,)
    else:
        _check_channels_first(x, weight)
        channels = weight.shape[0]
        canonical = x.reshape(x.shape[0], channels, math.prod(x.shape[2:]))  # an explicit size: an empty batch too
        w, b = weight.reshape(channels, 1), None if bias is None else bias.reshape(channels, 1)
        a = alpha.reshape(channels, 1) if channel_alpha else alpha
        reduce_dims = (0, 2)

    if _plain_formula_needed():
        impl = BACKENDS["eager"]
    else:
        impl = select_backend(backend, x.device, x.numel(), squash, channel_alpha)
        if x.numel() == 0:
            impl = BACKENDS["eager"]  # nothing to compute: skip compiling for an empty shape
    if squash == "tanh":  # every backend's apply takes tanh without the keyword
        y = impl.apply(canonical, a, w, b, reduce_dims)
    else:
        y = impl.apply(canonical, a, w, b, reduce_dims, squash=squash)
    return y if canonical is x else y.reshape_as(x)


def residual_dyt(
    x: torch.Tensor,
    residual: torch.Tensor,
    alpha: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    squash: str = "tanh",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, dyt(s))`` with ``s = x + residual``: a pre-norm block's residual add and norm.

    The fused and cpu backends do both in one pass (and one pass back); the others add, then call
    :func:`dyt`. Channels-last only. ``x`` and ``residual`` of two dtypes are added in the wider one,
    as ``x + residual`` would be, on every backend.
    """
    if torch._C._is_tracing() or _wrapper_subclass(x):  # a trace records the add; a DTensor takes no kernel
        s = x + residual
        return s, dyt(s, alpha, weight, bias, backend=backend, squash=squash)
    _check_operands(x, alpha, weight, bias)
    if not isinstance(residual, torch.Tensor) or x.shape != residual.shape:
        shown = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"x {tuple(x.shape)} and residual {shown} differ in shape")
    if residual.dtype != x.dtype:  # s in the wider dtype on every backend (a float32 residual stream stays so)
        wider = torch.result_type(x, residual)
        x, residual = x.to(wider), residual.to(wider)
    impl = (BACKENDS["eager"] if _plain_formula_needed()
            else select_backend(backend, x.device, x.numel(), squash, alpha.numel() != 1))
    if impl.apply_residual is None or x.numel() == 0:
        s = x + residual
        return s, dyt(s, alpha, weight, bias, backend=backend, squash=squash)
    _check_trailing(x, weight)
    channels = weight.numel()
    s, y = impl.apply_residual(
        x.reshape(-1, channels), residual.reshape(-1, channels), alpha, weight.reshape(channels),
        None if bias is None else bias.reshape(channels),
    )
    return s.reshape_as(x), y.reshape_as(x)
