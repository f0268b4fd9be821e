"""The cpu backend: fused DyT for CPU tensors, in C++ (csrc/dyt_cpu.cpp) with ATen's ``Vectorized``
and ``at::parallel_for``.

Forward is one pass (read x, write y); backward one pass over x and dy that writes dx and keeps
per-chunk partial column sums of d weight and d bias and a per-chunk d alpha, reduced at the end,
like the Triton ``fused`` backend. Residual-add + DyT is the same kernel with a second input.
The autograd functions and the dtype handling are in C++ too (``dyt`` and ``residual_dyt`` of the
extension): at the tiny LLaMA's 1024 x 192 a Python ``autograd.Function`` cost as much as the
kernels themselves.
Math and partials run in float32 for float32 / bfloat16 / float16 input, in float64 for float64.
In float32 math tanh is a rational approximation (Eigen's form; max abs error 2.8e-7 against
float64, within dyt.selfcheck's float32 tolerance): ATen's Sleef tanh and an exp-based tanh measured
7x and 2x slower on this project's CPU (docs/performance.md). float64 math uses ATen's tanh.

The extension is built with torch.utils.cpp_extension at first use and cached in torch's extension
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); cpp_extension's lock
file there makes concurrent processes (ranks) wait for one build instead of compiling at once. The
build targets the CPU capability torch itself dispatches to (AVX-512, AVX2 or the portable
default), so the flags match the machine and one build exists per capability.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "dyt_cpu.cpp"

_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}

_build_lock = threading.Lock()
_built: dict[str, object] = {}  # capability -> the extension module, or the CpuKernelBuildError it raised
log = logging.getLogger(__name__)


class CpuKernelBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded (no compiler, no ninja, a failed build)."""


@functools.cache
def capability() -> str:
    """The instruction set the kernels are built for: torch's own CPU dispatch level (which also
    honours ``ATEN_CPU_CAPABILITY``), or the portable default for any other."""
    level = torch.backends.cpu.get_cpu_capability()
    return level if level in _CAPABILITY_FLAGS else "DEFAULT"


def _build(level: str):
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as error:
        raise CpuKernelBuildError(f"building its C++ kernels needs ninja ({error})") from error
    log.info("dyt: building or loading the CPU DyT kernels for %s (a first build takes ~40 s)", level)
    try:
        return cpp_extension.load(
            name=f"dyt_cpu_{level.lower()}",
            sources=[str(SOURCE)],
            # -fopenmp: ATen's parallel_for is inline OpenMP in the headers; without it the kernels
            # run on one thread. The extension then shares torch's libgomp (same soname, loaded first).
            extra_cflags=["-O3", "-std=c++17", "-fopenmp", *_CAPABILITY_FLAGS[level]],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # compiler missing or failing: cpp_extension raises several types
        lines = str(error).strip().splitlines()
        raise CpuKernelBuildError(
            f"building its C++ kernels failed ({lines[-1] if lines else type(error).__name__})"
        ) from error


def load():
    """The extension module: built on the first call in a process (or loaded from the cache), then
    kept. Raises CpuKernelBuildError when it cannot be built; the failure is kept too (no second
    attempt in this process) and announced once with a warning."""
    level = capability()
    result = _built.get(level)  # after the first call: no lock (the dict is only ever added to)
    if result is not None and not isinstance(result, CpuKernelBuildError):
        return result
    with _build_lock:
        if level not in _built:
            try:
                _built[level] = _build(level)
            except CpuKernelBuildError as error:
                _built[level] = error
                warnings.warn(f"dyt: the 'cpu' DyT backend is unavailable: {error}. DyT runs the "
                              "'compiled' or 'eager' backend instead.", RuntimeWarning, stacklevel=3)
        result = _built[level]
    if isinstance(result, CpuKernelBuildError):
        raise result
    return result


def build_error() -> str | None:
    """None when the kernels are built (building them now if needed), else why they cannot be."""
    try:
        load()
    except CpuKernelBuildError as error:
        return str(error)
    return None


def dyt_cpu(x, alpha, weight, bias, reduce_dims):
    """CPU-fused DyT on the canonical layout (see :mod:`dyt.kernels`); channels-first input is
    transposed to channels-last (a copy) because the kernel streams rows of channels."""
    if x.ndim == 3:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        y = dyt_cpu(rows, alpha, weight.reshape(-1), None if bias is None else bias.reshape(-1), (0,))
        return y.reshape(x.shape[0], x.shape[2], x.shape[1]).movedim(-1, 1)
    return load().dyt(x, alpha, weight, bias)


def residual_dyt_cpu(x, residual, alpha, weight, bias):
    """(s, y) for 2-D ``(rows, channels)`` x and residual; see :func:`dyt.functional.residual_dyt`."""
    s, y = load().residual_dyt(x, residual, alpha, weight, bias)
    return s, y
