"""Which DyT implementation runs: one switch for the whole library.

Backends: ``eager`` (plain PyTorch, runs anywhere), ``compiled`` (torch.compile'd forward and
backward, dynamic shapes), ``fused`` (Triton kernels; CUDA, or Triton's interpreter on CPU with
``TRITON_INTERPRET=1``) and ``auto`` (fused on CUDA when Triton is there, else compiled, else eager;
on CPU, eager for inputs under CPU_COMPILED_MIN_ELEMENTS, where the compiled kernels' per-call
overhead costs more than their arithmetic saves).

The process-wide default is, in order: what :func:`set_default_backend` / :func:`use_backend` set,
the ``DYT_BACKEND`` environment variable, ``"auto"``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .kernels.compiled import dyt_compiled
from .kernels.eager import dyt_eager

AUTO = "auto"

CPU_COMPILED_MIN_ELEMENTS = 2**21
"""Below this many input elements ``auto`` runs eager on CPU. Measured on the project's 2-core
EPYC (docs/performance.md): at 1024 x 192 eager fwd+bwd took 0.61x the compiled time with one
thread, 0.42x with two; at 8192 x 1024 compiled took 0.46x / 0.65x of eager."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on the given device; the message names the ones that can."""


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    why_unavailable: Callable[[torch.device], str | None]
    """None when the backend can run on the device, else the reason it cannot."""
    apply: Callable[..., torch.Tensor]
    """apply(x, alpha, weight, bias, reduce_dims) on the canonical layout of dyt.kernels."""


def _eager_apply(x, alpha, weight, bias, reduce_dims):
    return dyt_eager(x, alpha, weight, bias)


@functools.cache
def _have_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _compiled_unavailable(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None if _have_cpp_compiler() else "torch.compile on CPU needs a C++ compiler (g++ or clang++)"
    if device.type == "cuda":
        return None if _have_triton() else "torch.compile on CUDA needs Triton"
    return f"torch.compile's inductor is not set up for {device.type} here"


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _fused_unavailable(device: torch.device) -> str | None:
    if not _have_triton():
        return "the fused backend needs Triton"
    if device.type == "cuda" or (device.type == "cpu" and _triton_interpreter_on()):
        return None
    return "the fused Triton kernels need a CUDA device (or TRITON_INTERPRET=1: Triton's interpreter, slow)"


def _fused_apply(x, alpha, weight, bias, reduce_dims):
    from .kernels.fused import dyt_fused  # imports Triton: only when the fused backend runs

    return dyt_fused(x, alpha, weight, bias, reduce_dims)


BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", "plain PyTorch ops; runs anywhere", lambda device: None, _eager_apply),
    "compiled": Backend(
        "compiled", "torch.compile'd forward and backward (inductor)", _compiled_unavailable, dyt_compiled
    ),
    "fused": Backend("fused", "Triton kernels (one pass each way)", _fused_unavailable, _fused_apply),
}
AUTO_ORDER = ("fused", "compiled", "eager")
NAMES = (AUTO, *BACKENDS)

_default: str | None = None


def check_backend_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown DyT backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


def default_backend() -> str:
    """The backend used when a layer or call names none."""
    if _default is not None:
        return _default
    return check_backend_name(os.environ.get("DYT_BACKEND", AUTO).strip().lower() or AUTO)


def set_default_backend(name: str | None) -> None:
    """Set the process-wide default (None: back to ``DYT_BACKEND`` or ``auto``)."""
    global _default
    _default = None if name is None else check_backend_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with ``name`` as the process-wide default backend."""
    global _default
    previous = _default
    set_default_backend(name)
    try:
        yield
    finally:
        _default = previous


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, in the order ``auto`` tries them."""
    device = torch.device(device)
    return [n for n in AUTO_ORDER if BACKENDS[n].why_unavailable(device) is None]


def auto_backend(device: torch.device | str, numel: int | None = None) -> str:
    """What ``auto`` picks for an input of ``numel`` elements (None: a large one): fused on CUDA,
    else compiled, else eager; never the interpreter; eager for small CPU inputs."""
    device = torch.device(device)
    usable = available_backends(device)
    if device.type == "cpu" and numel is not None and numel < CPU_COMPILED_MIN_ELEMENTS:
        return "eager"
    return next(n for n in usable if n != "fused" or device.type == "cuda")


def select_backend(name: str | None, device: torch.device | str, numel: int | None = None) -> Backend:
    """Resolve a backend name (None = the default) for a ``numel``-element input on ``device``.

    Raises BackendUnavailableError, naming the usable alternatives, when the named backend
    cannot run there.
    """
    device = torch.device(device)
    name = check_backend_name(name) if name is not None else default_backend()
    if name == AUTO:
        return BACKENDS[auto_backend(device, numel)]
    reason = BACKENDS[name].why_unavailable(device)
    if reason is not None:
        usable = ", ".join(available_backends(device))
        raise BackendUnavailableError(
            f"DyT backend {name!r} cannot run on {device.type} tensors: {reason}. "
            f"Usable here: {usable} (or 'auto')."
        )
    return BACKENDS[name]
