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

Backward writes dx over the incoming gradient when autograd hands over one that nothing else
references (the usual case in a model: the next layer's input gradient is a temporary). That saves
an activation-sized allocation per backward, and on Linux above glibc's 32 MiB mmap threshold the
page faults of a fresh tensor (docs/performance.md). Ownership is judged by reference counts, as
autograd's AccumulateGrad judges whether it may keep a gradient; a gradient the caller holds
(``y.backward(g)``), one a hook keeps, a retained one, one another branch still has to read, and any
under ``create_graph`` are never written over. :func:`reuse_gradient_buffers` turns it off.

The extension is built with torch.utils.cpp_extension at first use and cached in torch's extension
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); a kernel lock in the
build folder makes concurrent processes (ranks) wait for one build instead of compiling at once, and
once a build is stamped later processes import its library directly (:mod:`dyt.kernels.cpp_build`).
The build targets the CPU capability torch itself dispatches to (AVX-512, AVX2 or the portable
default), so the flags match the machine and one build exists per capability.
"""

from __future__ import annotations

from pathlib import Path

from . import in_layout_of
from .cpp_build import CpuExtension, CpuKernelBuildError, capability  # noqa: F401 (re-exported)

SOURCE = Path(__file__).parent / "csrc" / "dyt_cpu.cpp"

EXTENSION = CpuExtension("dyt_cpu", SOURCE, what="C++ kernels",
                         unavailable="dyt: the 'cpu' DyT backend is unavailable",
                         instead="DyT runs the 'compiled' or 'eager' backend instead.")
load = EXTENSION.load  # the extension module, built on the first call in a process (or loaded from the cache)
build_error = EXTENSION.build_error  # None when the kernels are built, else why they cannot be


def dyt_cpu(x, alpha, weight, bias, reduce_dims):
    """CPU-fused DyT on the canonical layout (see :mod:`dyt.kernels`); channels-first input is
    transposed to channels-last (a copy) because the kernel streams rows of channels, and the result
    comes back in the input's layout, as eager's elementwise ops return it (``y.view(...)`` works where
    it works on eager's)."""
    if x.ndim == 3:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        y = dyt_cpu(rows, alpha, weight.reshape(-1), None if bias is None else bias.reshape(-1), (0,))
        return in_layout_of(x, y.reshape(x.shape[0], x.shape[2], x.shape[1]).movedim(-1, 1))
    return load().dyt(x, alpha, weight, bias)


def residual_dyt_cpu(x, residual, alpha, weight, bias):
    """(s, y) for 2-D ``(rows, channels)`` x and residual; see :func:`dyt.functional.residual_dyt`."""
    s, y = load().residual_dyt(x, residual, alpha, weight, bias)
    return s, y


def task_elements() -> int:
    """Elements a parallel task needs before the kernels use another thread: ATen's grain (32768), or
    2**18 where idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE`` or ``GOMP_SPINCOUNT=0``,
    read when the extension loads), since waking one costs more than a second thread saves below
    that size (docs/performance.md)."""
    return load().task_elements()


def stream_min_bytes(nbytes: int | None = None) -> int:
    """The size from which the forward writes a float32 ``y`` whose pages are already mapped with
    streaming stores (16 MiB by default: below it an output may stay in cache for the op that reads
    it next; docs/performance.md). Sets it for the process when ``nbytes`` is given (a huge value
    turns streaming off); returns the setting in effect."""
    return load().stream_min_bytes(nbytes)


def reuse_gradient_buffers(enabled: bool | None = None) -> bool:
    """Whether the cpu backend's backward writes dx over an unshared incoming gradient (on by default;
    off where the reference count of an unshared gradient could not be measured at load). Sets it
    for the process when ``enabled`` is given; returns the setting in effect."""
    return load().reuse_gradient_buffers(enabled)
