"""Which DyT implementation runs: one switch for the whole library.

Backends: ``eager`` (plain PyTorch, runs anywhere), ``compiled`` (torch.compile'd forward and
backward, dynamic shapes), ``fused`` (Triton kernels; CUDA, or Triton's interpreter on CPU with
``TRITON_INTERPRET=1``), ``cpu`` (fused C++ kernels for CPU tensors, built at first use) and
``auto`` (fused on CUDA when Triton is there; on CPU the cpu backend when its kernels build, else
compiled, else eager, with eager for inputs under CPU_COMPILED_MIN_ELEMENTS, where the compiled
kernels' per-call overhead costs more than their arithmetic saves).

The process-wide default is, in order: what :func:`set_default_backend` / :func:`use_backend` set,
the ``DYT_BACKEND`` environment variable, ``"auto"``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .kernels import cpu_fused
from .kernels.compiled import dyt_compiled
from .kernels.eager import dyt_eager

AUTO = "auto"

CPU_COMPILED_MIN_ELEMENTS = 2**21
"""Where the cpu backend cannot be built: below this many input elements ``auto`` runs eager on
CPU, compiled from here. Measured on the project's 2-core
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
    """apply(x, alpha, weight, bias, reduce_dims) on the canonical layout of dyt.kernels; a backend
    with ``all_options`` also takes ``squash=``."""
    all_options: bool = False
    """Runs every squash function and a per-channel alpha (the paper's ablations); False: tanh with
    a scalar alpha only."""
    apply_residual: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    """apply_residual(x, residual, alpha, weight, bias) -> (x + residual, DyT(x + residual)) in one
    kernel, on 2-D ``(rows, channels)`` inputs; None: the add runs as its own op before DyT."""


def _eager_apply(x, alpha, weight, bias, reduce_dims, squash="tanh"):
    return dyt_eager(x, alpha, weight, bias, squash)


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


def _fused_apply_residual(x, residual, alpha, weight, bias):
    from .kernels.fused import FusedResidualDyTFunction

    return FusedResidualDyTFunction.apply(x, residual, alpha, weight, bias)


def _cpu_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "its C++ kernels run on CPU tensors (the fused backend is their CUDA counterpart)"
    if not _have_cpp_compiler():
        return "its C++ kernels need a C++ compiler (g++ or clang++) to build"
    return cpu_fused.build_error()  # builds the kernels the first time (cached on disk after)


BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", "plain PyTorch ops; runs anywhere", lambda device: None, _eager_apply, all_options=True),
    "compiled": Backend(
        "compiled", "torch.compile'd forward and backward (inductor)", _compiled_unavailable, dyt_compiled,
        all_options=True,
    ),
    "fused": Backend("fused", "Triton kernels (one pass each way)", _fused_unavailable, _fused_apply,
                     apply_residual=_fused_apply_residual),
    "cpu": Backend("cpu", "C++ kernels for CPU tensors (one pass each way)", _cpu_unavailable, cpu_fused.dyt_cpu,
                   apply_residual=cpu_fused.residual_dyt_cpu),
}
AUTO_ORDER = ("fused", "cpu", "compiled", "eager")
NAMES = (AUTO, *BACKENDS)

_default: str | None = None


def check_backend_name(name: str, where: str = "") -> str:
    """``name`` as a backend's name (spaces and case aside, as ``DYT_BACKEND`` is read), or a
    ValueError naming ``where`` it came from and the choices."""
    word = name.strip().lower() if isinstance(name, str) else name
    if word not in NAMES:
        raise ValueError(f"unknown DyT backend {name!r}{where}; choose one of {', '.join(NAMES)}")
    return word


def why_not_variant(name: str, squash: str, channel_alpha: bool) -> str | None:
    """None when backend ``name`` (or ``auto``, which picks one that can) runs DyT with this squash
    function and alpha layout, else a one-line reason naming the backends that do."""
    if name == AUTO or BACKENDS[name].all_options or (squash == "tanh" and not channel_alpha):
        return None
    got = f"squash {squash!r}" + (" with a per-channel alpha" if channel_alpha else "")
    able = ", ".join(n for n, b in BACKENDS.items() if b.all_options)
    return f"DyT backend {name!r} runs tanh with a scalar alpha only, not {got}; use {able} or auto"


def default_backend() -> str:
    """The backend used when a layer or call names none."""
    if _default is not None:
        return _default
    return check_backend_name(os.environ.get("DYT_BACKEND", "").strip() or AUTO, " (in DYT_BACKEND)")


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


def device_arg(text: str) -> torch.device:
    """A ``--device`` option's value (argparse ``type``): a cpu or cuda device this machine has, or
    ``auto`` (the first CUDA GPU where torch sees one, else the CPU); a GPU always with its index,
    so one device has one name."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: DyT's tools run on cpu or cuda devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "cuda" and device.index is None:
        # a new process's current GPU, named without asking CUDA: parsing must not start a CUDA
        # context (a compare's parent process would hold one on GPU 0 while its ranks train there)
        return torch.device("cuda", 0)
    return device


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, in the order ``auto`` tries them."""
    device = torch.device(device)
    return [n for n in AUTO_ORDER if BACKENDS[n].why_unavailable(device) is None]


def auto_backend(device: torch.device | str, numel: int | None = None, all_options: bool = False) -> str:
    """What ``auto`` picks for an input of ``numel`` elements (None: a large one): fused on CUDA;
    on CPU the cpu backend at every size (measured faster than eager and compiled at every shape
    and dtype tried, docs/performance.md); where it cannot build, compiled, or eager for small
    inputs; never the interpreter. ``all_options``: only backends that run every squash function
    and a per-channel alpha. Backends are checked in order, so the cpu kernels are only built when
    auto would pick them."""
    device = torch.device(device)
    small_cpu = device.type == "cpu" and numel is not None and numel < CPU_COMPILED_MIN_ELEMENTS
    candidates = (
        n for n in AUTO_ORDER
        if (BACKENDS[n].all_options or not all_options)
        and (n != "fused" or device.type == "cuda")
        and not (n == "compiled" and small_cpu)
        and BACKENDS[n].why_unavailable(device) is None
    )
    return next(candidates)


def select_backend(
    name: str | None, device: torch.device | str, numel: int | None = None, squash: str = "tanh",
    channel_alpha: bool = False,
) -> Backend:
    """Resolve a backend name (None = the default) for a ``numel``-element input on ``device``, DyT
    with ``squash`` and a scalar or per-channel alpha.

    Raises BackendUnavailableError, naming the usable alternatives, when the named backend
    cannot run there or cannot run that squash / alpha layout.
    """
    device = torch.device(device)
    name = check_backend_name(name) if name is not None else default_backend()
    if name == AUTO:
        return BACKENDS[auto_backend(device, numel, all_options=squash != "tanh" or channel_alpha)]
    variant_reason = why_not_variant(name, squash, channel_alpha)
    if variant_reason is not None:
        raise BackendUnavailableError(variant_reason)
    reason = BACKENDS[name].why_unavailable(device)
    if reason is not None:
        usable = ", ".join(available_backends(device))
        raise BackendUnavailableError(
            f"DyT backend {name!r} cannot run on {device.type} tensors: {reason}. "
            f"Usable here: {usable} (or 'auto')."
        )
    return BACKENDS[name]
