"""Every DyT backend against a float64 reference, with no test framework needed.

The checks are plain functions that raise AssertionError: tests/test_fused.py and
tests/test_dyt_layer.py call them, and ``python -m dyt.selfcheck`` runs them on a machine without
pytest (scripts/gpu_check.sh)::

    python -m dyt.selfcheck [--device cuda] [--backend fused] [--no-llama]

It checks every backend usable on the device, in float32, bfloat16 and float16, forward and all
gradients, at small odd shapes and (on CUDA) at LLaMA shapes, and each backend's second derivatives
(double backward, float64); prints PASS/FAIL per check and a last line ``N passed, M failed``;
exits 1 when a check failed or none ran. On CPU the fused backend runs
only in Triton's interpreter (``TRITON_INTERPRET=1`` in the environment) and LLaMA shapes are skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import torch

from .backends import BACKENDS, BackendUnavailableError, available_backends, device_arg, select_backend
from .errors import CommandParser, help_description
from .functional import dyt, residual_dyt
from .modules import ResidualDyT

# (forward atol/rtol, gradient rtol) per input dtype: outputs are rounded to the input dtype.
TOL = {
    torch.float32: dict(atol=2e-6, rtol=2e-6, grad=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=1e-2, grad=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3, grad=3e-3),
    torch.float64: dict(atol=1e-10, rtol=1e-10, grad=1e-9),  # float64 math (fused computing in float32: 1.5e-8)
}
SMALL_SHAPES = [(3, 5, 1), (3, 7), (33, 300), (5, 1023), (2, 4097)]
LLAMA_SHAPES = [(4096, 4096), (16384, 4096), (8192, 8192)]  # 7B/13B hidden sizes, 70B-like width


def reference(x, alpha, weight, bias=None, channels_last=True):
    """Float64 pure-torch DyT: the ground truth every backend is checked against."""
    x64 = x.double()
    w64 = weight.double()
    b64 = None if bias is None else bias.double()
    if not channels_last:
        shape = (-1,) + (1,) * (x.ndim - 2)
        w64 = w64.reshape(shape)
        b64 = None if b64 is None else b64.reshape(shape)
    y = w64 * torch.tanh(alpha.double() * x64)
    return y if b64 is None else y + b64


def ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at each element of ``value`` (float64), subnormals included."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(value.double())
    spacing = info.eps * torch.pow(2.0, exponent.double() - 1)
    subnormal = info.smallest_normal * info.eps
    return torch.where(value == 0, subnormal, spacing.clamp_min(subnormal))


HALF_MATH_ERROR = 3e-5
"""Relative error the backends' float32 math may add before rounding to bf16 / fp16: the fused
kernel's tanh for half outputs is within 2e-5 (dyt.kernels.fused._tanh), far below either dtype's
rounding (3.9e-3, 4.9e-4)."""


def assert_output_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "output",
                        terms: torch.Tensor | None = None, also: torch.Tensor | None = None,
                        also_slack: torch.Tensor | float = 0.0) -> None:
    """A backend's output against the float64 reference. In bf16 / fp16 the math runs in float32 and
    is rounded once: within one unit in the last place of ``dtype`` at the reference (either rounding
    mode: Triton's interpreter truncates) plus :data:`HALF_MATH_ERROR` of ``terms`` (the magnitude of
    what was summed: |w tanh(alpha x)| + |b|, where an output near 0 comes from two that cancel;
    default |want|). A forward computed in the half dtype itself is 70-200 units off near zero, and
    ``TOL``'s absolute bound alone let it pass.
    ``also``: a second reference an element may match instead, within ``also_slack`` more (residual
    DyT squashing the sum rounded to ``dtype``, as eager does, rather than the exact one: any sum
    within one unit of the exact one, whichever way a backend rounds it)."""
    tol = TOL[dtype]
    if dtype not in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(got.double(), want, atol=tol["atol"], rtol=tol["rtol"])
        return
    err = (got.double() - want).abs()
    if also is not None:
        err = torch.minimum(err, ((got.double() - also).abs() - also_slack).clamp_min(0))
    bound = ulp(want, dtype) + HALF_MATH_ERROR * (want.abs() if terms is None else terms)
    worst = (err / bound).max().item() if want.numel() else 0.0
    assert worst <= 1.0, f"{what}: off by {worst:.3g} times the bound of one {dtype} unit in the last place"


def assert_grad_close(got, want, rtol, what=""):
    """max |got - want| <= rtol * max(max |want|, 1): a gradient's error relative to its scale."""
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * max(scale, 1.0), f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _inputs(shape, dtype, device, count):
    """A generator on ``device`` seeded by the channel count, and ``count`` tensors of ``shape`` drawn
    from it; the first is scaled by 3 to reach into tanh's tails."""
    g = torch.Generator(device).manual_seed(shape[-1])
    tensors = [torch.randn(shape, generator=g, device=device) for _ in range(count)]
    tensors[0] *= 3
    return g, [t.to(dtype) for t in tensors]


def _param_dtype(dtype: torch.dtype, params_in_dtype: bool = False) -> torch.dtype:
    """Parameters as a model holds them: float32 beside half / bfloat16 / float32 activations (their
    gradients are float32-rounded), float64 in a float64 model; with ``params_in_dtype``, in the
    activations' dtype (a DeepSpeed bf16 / fp16 engine's working copy, beside its fp32 masters)."""
    if params_in_dtype:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_dyt(backend: str, dtype: torch.dtype, shape, with_bias: bool = True, device="cpu",
              params_in_dtype: bool = False) -> None:
    """``dyt(x)`` (channels last) on ``backend``: output dtype, output and the gradients of x, alpha,
    weight and bias against :func:`reference` in float64, within ``TOL[dtype]`` (the reference reads
    the parameters as given, so ``params_in_dtype`` checks the math on bf16 / fp16 parameters)."""
    g, (x, dy) = _inputs(shape, dtype, device, 2)
    cols = shape[-1]
    params = {"device": device, "dtype": _param_dtype(dtype, params_in_dtype)}
    alpha = torch.tensor([0.7], **params)
    weight = torch.randn(cols, generator=g, **params)
    bias = torch.randn(cols, generator=g, **params) if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, alpha, weight, bias) if t is not None]
    y = dyt(*leaves[:3], leaves[3] if with_bias else None, backend=backend)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = reference(*ref[:3], ref[3] if with_bias else None)
    y_ref.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype, f"output dtype {y.dtype}, input {dtype}"
    with torch.no_grad():
        terms = (ref[2] * torch.tanh(ref[1] * ref[0])).abs() + (ref[3].abs() if with_bias else 0.0)
    assert_output_close(y, y_ref.detach(), dtype, terms=terms)
    for name, got, want in zip(["x", "alpha", "weight", "bias"], leaves, ref):
        assert_grad_close(got.grad, want.grad, tol["grad"], f"grad {name}")


def check_residual_dyt(backend: str, dtype: torch.dtype, shape, with_bias: bool = True, device="cpu") -> None:
    """``ResidualDyT(x, r) -> (s, y)`` on ``backend``, gradients arriving at both s and y: s, y and
    the gradients of x, r, alpha, weight and bias against float64, within ``TOL[dtype]``."""
    g, (x, r, ds, dy) = _inputs(shape, dtype, device, 4)
    cols = shape[-1]
    layer = ResidualDyT(cols, alpha_init=0.9, bias=with_bias, backend=backend, device=device, dtype=_param_dtype(dtype))
    with torch.no_grad():
        layer.weight.copy_(torch.rand(cols, generator=g, device=device) + 0.5)
        if with_bias:
            layer.bias.copy_(torch.randn(cols, generator=g, device=device))
    xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
    s, y = layer(xi, ri)
    torch.autograd.backward([s, y], [ds, dy])
    x64, r64 = x.double().requires_grad_(), r.double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in layer.parameters()]  # alpha, weight, bias
    s64 = x64 + r64
    y64 = reference(s64, *params)
    torch.autograd.backward([s64, y64], [ds.double(), dy.double()])
    tol = TOL[dtype]
    assert s.dtype == y.dtype == dtype, f"output dtypes {s.dtype}, {y.dtype}, input {dtype}"
    assert_output_close(s, s64.detach(), dtype, "sum")
    with torch.no_grad():  # of the sum rounded to dtype: within |dy/ds| x one unit of the sum of the one returned
        y_of_rounded_sum = reference(s.double(), *params)
        alpha64, weight64 = params[0].detach(), params[1].detach()
        slope = (weight64 * alpha64 * (1 - torch.tanh(alpha64 * s64.detach()) ** 2)).abs()
        terms = (weight64 * torch.tanh(alpha64 * s64.detach())).abs() + (params[2].detach().abs() if with_bias else 0.0)
    assert_output_close(y, y64.detach(), dtype, terms=terms, also=y_of_rounded_sum,
                        also_slack=slope * ulp(s64.detach(), dtype))
    got = [xi.grad, ri.grad] + [p.grad for p in layer.parameters()]
    want = [x64.grad, r64.grad] + [p.grad for p in params]
    for name, gv, wv in zip(["x", "residual", "alpha", "weight", "bias"], got, want):
        assert_grad_close(gv, wv, tol["grad"], f"grad {name}")


def check_residual_dyt_one_output(backend: str, device="cpu") -> None:
    """``ResidualDyT(x, r) -> (s, y)`` on ``backend`` when only one output is used, the other's gradient
    arriving as None: only y (x and r both get DyT's gradient at s, against the float64 reference),
    only s (x and r get that gradient alone, the parameters none)."""
    g = torch.Generator(device).manual_seed(5)
    x, r, dy = (torch.randn(4, 16, generator=g, device=device) for _ in range(3))
    layer = ResidualDyT(16, alpha_init=0.9, backend=backend, device=device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.uniform_(-0.5, 0.5, generator=g)
    xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
    layer(xi, ri)[1].backward(dy)
    s64 = (x + r).double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in layer.parameters()]  # alpha, weight, bias
    reference(s64, *params).backward(dy.double())
    grads = [("x", xi.grad, s64.grad), ("residual", ri.grad, s64.grad)]
    grads += [(name, p.grad, p64.grad) for name, p, p64 in zip(["alpha", "weight", "bias"], layer.parameters(), params)]
    for name, got, want in grads:
        assert got is not None, f"only y used: no gradient for {name}"
        assert_grad_close(got, want, TOL[torch.float32]["grad"], f"only y used: grad {name}")
    layer.zero_grad(set_to_none=True)
    xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
    layer(xi, ri)[0].backward(dy)
    torch.testing.assert_close(xi.grad, dy, msg="only s used: grad x is not the gradient at s")
    torch.testing.assert_close(ri.grad, dy, msg="only s used: grad residual is not the gradient at s")
    assert all(p.grad is None for p in layer.parameters()), "only s used: DyT's parameters got a gradient"


def check_double_backward(backend: str, device="cpu") -> None:
    """Second derivatives of DyT and residual DyT on ``backend`` against finite differences (float64,
    ``gradgradcheck``), the first-order gradients built under ``create_graph`` against the float64
    reference, and the gradients of a gradient penalty beside another term against the eager
    backend's (float32): a backend whose gradients carried no history would silently leave DyT out."""
    g = torch.Generator().manual_seed(11)
    x, r = (torch.randn(5, 7, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    alpha = torch.tensor([0.8], dtype=torch.float64, device=device, requires_grad=True)
    weight, bias = (torch.randn(7, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    torch.autograd.gradgradcheck(lambda *t: dyt(*t, backend=backend), (x, alpha, weight, bias))
    torch.autograd.gradgradcheck(lambda *t: residual_dyt(*t, backend=backend), (x, r, alpha, weight, bias))
    # gradgradcheck differentiates whatever first-order gradients the backward builds, right or wrong:
    # those gradients (what runs under create_graph) against the reference's.
    dy, ds = (torch.randn(5, 7, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    leaves = (x, alpha, weight, bias)
    got = torch.autograd.grad(dyt(*leaves, backend=backend), leaves, dy, create_graph=True)
    want = torch.autograd.grad(reference(*leaves), leaves, dy)
    s, y = residual_dyt(x, r, alpha, weight, bias, backend=backend)
    got += torch.autograd.grad((s, y), (x, r) + leaves[1:], (ds, dy), create_graph=True)
    s64 = x + r
    want += torch.autograd.grad((s64, reference(s64, *leaves[1:])), (x, r) + leaves[1:], (ds, dy))
    names = [f"dyt {n}" for n in ("x", "alpha", "weight", "bias")]
    names += [f"residual dyt {n}" for n in ("x", "residual", "alpha", "weight", "bias")]
    for what, gv, wv in zip(names, got, want, strict=True):
        assert_grad_close(gv.detach(), wv, TOL[torch.float64]["grad"], f"create_graph grad {what}")
    penalties = {}
    for name in (backend, "eager"):
        leaves = [t.detach().float().requires_grad_() for t in (x, alpha, weight)]
        y = dyt(*leaves, backend=name) + leaves[0] ** 2
        (dx,) = torch.autograd.grad(y.sum(), leaves[0], create_graph=True)
        dx.pow(2).sum().backward()
        penalties[name] = [t.grad for t in leaves]
    for what, got, want in zip(["x", "alpha", "weight"], penalties[backend], penalties["eager"], strict=True):
        assert got is not None, f"double backward: no gradient for {what}"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def checks(device: str, backends: list[str], llama: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, check) pairs: each backend's second derivatives, and each backend and dtype at the small
    shapes (with and without bias) and residual + DyT at one of them; with ``llama``, at LLaMA shapes
    too."""
    def named(fn, backend, dtype, shape, with_bias):
        name = (f"{fn.__name__.removeprefix('check_')} {backend} {str(dtype).removeprefix('torch.')} "
                f"{'x'.join(map(str, shape))} {'bias' if with_bias else 'nobias'}")
        return name, lambda: fn(backend, dtype, shape, with_bias, device)

    for backend in backends:
        yield f"double_backward {backend}", lambda backend=backend: check_double_backward(backend, device)
        yield (f"residual_dyt_one_output {backend}",
               lambda backend=backend: check_residual_dyt_one_output(backend, device))
        for dtype in TOL:
            for shape in SMALL_SHAPES:
                for with_bias in (True, False):
                    yield named(check_dyt, backend, dtype, shape, with_bias)
            yield named(check_residual_dyt, backend, dtype, (33, 300), True)
            if dtype in (torch.bfloat16, torch.float16):  # parameters as DeepSpeed's half-precision engines hold them
                yield (f"dyt {backend} {str(dtype).removeprefix('torch.')} 33x300 bias, parameters in "
                       f"{str(dtype).removeprefix('torch.')}",
                       lambda backend=backend, dtype=dtype: check_dyt(backend, dtype, (33, 300), True, device,
                                                                      params_in_dtype=True))
            if llama:
                for shape in LLAMA_SHAPES:
                    yield named(check_dyt, backend, dtype, shape, True)
                yield named(check_residual_dyt, backend, dtype, (16384, 4096), False)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = CommandParser(prog="python -m dyt.selfcheck", description=help_description(__doc__),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_arg, default="cuda" if cuda else "cpu")
    parser.add_argument("--backend", dest="backends", action="append", choices=list(BACKENDS),
                        help="repeatable (default: every backend usable on the device)")
    parser.add_argument("--no-llama", dest="llama", action="store_false", help="skip the LLaMA shapes")
    args = parser.parse_args(argv)
    device = args.device
    usable = available_backends(device)
    for name in args.backends or []:  # an interpreter run (TRITON_INTERPRET=1) makes fused usable on cpu
        try:
            select_backend(name, device)
        except BackendUnavailableError as error:
            parser.error(f"argument --backend: {error}")
    backends = args.backends or usable
    llama = args.llama and device.type == "cuda"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    print(f"dyt.selfcheck on {device}: torch {torch.__version__}, triton {triton_version}; "
          f"backends {', '.join(backends)} (usable here: {', '.join(usable)})", flush=True)
    if "fused" not in backends and device.type == "cpu" and not args.backends:
        print("SKIP fused: no CUDA device (set TRITON_INTERPRET=1 to check it in Triton's interpreter)")
    if not llama:
        print("SKIP LLaMA shapes: " + ("--no-llama" if device.type == "cuda" else "they need a GPU"))
    passed = failed = 0
    for name, check in checks(str(device), backends, llama):
        start = time.perf_counter()
        try:
            check()
        except Exception as exc:  # a failed check (or a backend error) is reported, never fatal
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}".rstrip())
            if not isinstance(exc, AssertionError):
                traceback.print_exc(limit=-3, file=sys.stdout)
        else:
            passed += 1
            print(f"PASS {name} ({time.perf_counter() - start:.2f} s)")
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
