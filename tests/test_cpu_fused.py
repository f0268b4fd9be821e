"""The cpu backend (C++ kernels for CPU tensors) against the float64 reference, as the Triton kernels
are checked in test_fused.py. The extension builds once per machine (cached in torch's extension
directory); the first test that needs it pays the ~40 s build."""

import mmap
import warnings

import pytest
import torch

import dyt
from dyt import DyT, ResidualDyT
from dyt.backends import _have_cpp_compiler
from dyt.functional import dyt as dyt_fn
from dyt.functional import residual_dyt
from dyt.kernels import cpu_fused
from dyt.selfcheck import (
    TOL,
    assert_grad_close,
    check_double_backward,
    check_dyt,
    check_residual_dyt,
    check_residual_dyt_one_output,
    reference,
)

pytestmark = pytest.mark.skipif(not _have_cpp_compiler(), reason="the cpu backend needs a C++ compiler")

# Odd channel counts cover vector tails (16 floats / 32 bf16 per vector on AVX-512); 1000 x 77 spans
# several row chunks where idle OpenMP threads spin, 600 x 501 also where they sleep (a task then needs
# 2**18 elements: cpu_fused.task_elements; the suite's default, tests/conftest.py), so the per-chunk
# partial sums are reduced across chunks.
SHAPES = [(1, 1), (3, 7), (33, 300), (5, 1023), (2, 4097), (1000, 77), (600, 501), (3, 5, 17)]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Build (or load) the extension once; a failed build fails here, with the compiler's reason."""
    return cpu_fused.load()


def _stdout_of_a_new_process(code: str, env: dict[str, str] | None = None) -> str:
    """What ``python -c code`` printed in a fresh interpreter (one that loads the extension as a new
    rank does, or reads the environment when it loads it); fails the test with its stderr otherwise."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_cpu_matches_float64_reference(dtype, shape, with_bias):
    check_dyt("cpu", dtype, shape, with_bias)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_residual_dyt_matches_float64_reference(dtype, with_bias):
    check_residual_dyt("cpu", dtype, (33, 300), with_bias)
    check_residual_dyt("cpu", dtype, (1000, 77), with_bias)


def test_residual_goes_through_the_fused_kernel(monkeypatch, kernels):
    calls = []

    class Counting:  # the extension, counting its residual entry point
        def __getattr__(self, name):
            return getattr(kernels, name)

        def residual_dyt(self, *args):
            calls.append(args)
            return kernels.residual_dyt(*args)

    monkeypatch.setattr(cpu_fused, "load", Counting)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    s, y = residual_dyt(x, r, torch.tensor([0.5]), torch.ones(16), backend="cpu")
    assert len(calls) == 1  # one kernel call did the add and DyT
    torch.testing.assert_close(s, x + r)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_residual_dyt_adds_two_dtypes_in_the_wider_one(backend):
    """A bfloat16 branch output added to a float32 residual stream: s stays float32 and exact on
    every backend, as ``x + residual`` (the cpu kernel rounded it to bfloat16)."""
    x, r = torch.randn(8, 16).bfloat16(), torch.randn(8, 16)
    s, y = residual_dyt(x, r, torch.tensor([0.5]), torch.ones(16), backend=backend)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, x.float() + r, rtol=0, atol=0)


def test_saturated_inputs_give_no_gradient_to_alpha_or_x():
    """Where the kernel's tanh saturates its derivative is 0, so an outlier pushes alpha by nothing
    (the rational form stops at 0.99999976: 1 - t^2 = 4.8e-7 gave d alpha 4.8e-7 dy w x, 19.5 at
    x = 1e4); a NaN still gives NaN gradients."""
    for value in (50.0, 1e4, -1e30):
        x = torch.full((64, 64), value, requires_grad=True)
        alpha, weight = torch.tensor([0.5], requires_grad=True), torch.ones(64, requires_grad=True)
        y = dyt_fn(x, alpha, weight, torch.zeros(64), backend="cpu")
        y.sum().backward()
        torch.testing.assert_close(y, torch.full_like(y, 1.0 if value > 0 else -1.0), atol=3e-7, rtol=0)
        assert alpha.grad.item() == 0 and x.grad.abs().max().item() == 0
    x = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    alpha = torch.tensor([0.5], requires_grad=True)
    dyt_fn(x, alpha, torch.ones(2), None, backend="cpu").sum().backward()
    assert x.grad[0, 0].isfinite() and x.grad[0, 1].isnan() and alpha.grad.isnan().all()


def test_parameter_gradients_keep_their_digits_over_many_rows_and_any_thread_count():
    """Float partial sums over every row of a chunk lost digits (dbias 2.3e-5 off over 262144 rows);
    and the chunks followed the thread count, so the sums' bits did too."""
    threads = torch.get_num_threads()
    try:
        grads = []
        for count in (1, 2):
            torch.set_num_threads(count)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(262144, 8, generator=g, requires_grad=True)
            dy = torch.rand(262144, 8, generator=g)
            alpha, weight = torch.tensor([0.5], requires_grad=True), torch.ones(8, requires_grad=True)
            bias = torch.zeros(8, requires_grad=True)
            dyt_fn(x, alpha, weight, bias, backend="cpu").backward(dy)
            exact = dy.double().sum(0)
            assert ((bias.grad.double() - exact).abs() / exact).max() < 1e-6
            grads.append((alpha.grad, weight.grad, bias.grad))
        assert all(torch.equal(one, two) for one, two in zip(*grads))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_residual_dyt_squashes_s_as_stored(dtype):
    """y is DyT of s rounded to its dtype (the s returned and read back by the backward), as eager."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(512, 64, generator=g).to(dtype), torch.randn(512, 64, generator=g).to(dtype)
    alpha, weight = torch.tensor([0.7]), torch.randn(64, generator=g)
    s, y = residual_dyt(x, r, alpha, weight, backend="cpu")
    assert torch.equal(y, dyt_fn(s, alpha, weight, backend="cpu"))


def test_residual_dyt_when_one_output_is_used():
    check_residual_dyt_one_output("cpu")


def test_residual_dyt_when_only_y_is_used_with_an_expanded_gradient():
    layer = ResidualDyT(16, backend="cpu")
    x = torch.randn(4, 16, requires_grad=True)
    r = torch.randn(4, 16, requires_grad=True)
    _, y = layer(x, r)
    y.sum().backward()  # an expanded (stride 0) gradient, and none at s
    torch.testing.assert_close(x.grad, r.grad)
    x64 = (x.detach() + r.detach()).double().requires_grad_()
    reference(x64, layer.alpha.detach(), layer.weight.detach(), layer.bias.detach()).sum().backward()
    assert_grad_close(x.grad, x64.grad, TOL[torch.float32]["grad"], "grad x")


def _leaves(x, cols, g, with_bias=True):
    alpha = torch.tensor([0.6]).requires_grad_()
    weight = torch.randn(cols, generator=g).requires_grad_()
    bias = torch.randn(cols, generator=g).requires_grad_() if with_bias else None
    return x.requires_grad_(), alpha, weight, bias


def _check_against_reference(x, alpha, weight, bias, tol=TOL[torch.float32], channels_last=True):
    """Forward and every gradient of dyt(..., backend='cpu') against float64, NaN where it has NaN."""
    y = dyt_fn(x, alpha, weight, bias, channels_last=channels_last, backend="cpu")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(dy)
    leaves = [t for t in (x, alpha, weight, bias) if t is not None]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y64 = reference(ref[0], ref[1], ref[2], ref[3] if bias is not None else None, channels_last=channels_last)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), atol=tol["atol"], rtol=tol["rtol"], equal_nan=True)
    for name, got, want in zip(["x", "alpha", "weight", "bias"], leaves, ref):
        nan = want.grad.isnan()
        assert torch.equal(got.grad.isnan(), nan), f"grad {name}: NaN where the reference has none, or not where it has"
        assert_grad_close(got.grad[~nan], want.grad[~nan], tol["grad"], f"grad {name}")


class _NextLayer(torch.autograd.Function):
    """Identity forward; its backward hands back a new gradient (3 g) that nothing else holds, as a
    model's next layer does, and records where that gradient lives."""

    sent: list[int] = []

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        out = g * 3
        _NextLayer.sent.append(out.data_ptr())
        return out


class _PreviousLayer(torch.autograd.Function):
    """Identity; its backward records where the gradient it receives (DyT's dx) lives."""

    received: list[int] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _PreviousLayer.received.append(g.data_ptr())
        return g


@pytest.fixture
def gradient_reuse():
    """Sets whether backward may write dx over an unshared incoming gradient; restores it after."""
    before = cpu_fused.reuse_gradient_buffers()
    yield cpu_fused.reuse_gradient_buffers
    cpu_fused.reuse_gradient_buffers(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(40, 33), (2, 6, 33)], ids=["rows", "batch-tokens-channels"])
@pytest.mark.parametrize("residual", [False, True], ids=["dyt", "residual-dyt"])
def test_dx_is_written_over_an_unshared_incoming_gradient(gradient_reuse, kernels, dtype, shape, residual):
    """In a model the gradient reaching the norm is the next layer's temporary: dx takes its memory
    (no new activation-sized tensor), and every gradient is bit for bit what a new dx gives."""
    assert kernels.owned_gradient_refs() > 0  # measured at import on this torch: reuse is possible
    g = torch.Generator().manual_seed(7)
    x0, r0 = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    upstream = torch.randn(shape, generator=g).to(dtype)
    params0 = (torch.tensor([0.6]), torch.randn(33, generator=g), torch.randn(33, generator=g))
    grads = {}
    for reuse in (True, False):
        gradient_reuse(reuse)
        x, r = x0.clone().requires_grad_(), r0.clone().requires_grad_()
        params = [p.clone().requires_grad_() for p in params0]
        if residual:
            _, y = residual_dyt(_PreviousLayer.apply(x), r, *params, backend="cpu")
        else:
            y = dyt_fn(_PreviousLayer.apply(x), *params, backend="cpu")
        (_NextLayer.apply(y) * upstream).sum().backward()
        assert (_PreviousLayer.received[-1] == _NextLayer.sent[-1]) == reuse
        grads[reuse] = [t.grad for t in (x, *params, *([r] if residual else []))]
    for with_reuse, without in zip(grads[True], grads[False]):
        assert torch.equal(with_reuse, without)


def _visible_gradient_scenarios():
    """Graphs where the gradient reaching DyT is also seen elsewhere: (name, run) with run(layer, x)
    returning the tensors the caller can see besides the leaves' grads."""

    def held(layer, x):  # the caller passes and keeps the gradient
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
        layer(x).backward(dy)
        return [dy]

    def hook_keeps_it(layer, x):
        kept = []
        y = layer(x)
        y.register_hook(kept.append)
        (y * 2).sum().backward()
        return kept

    def retained(layer, x):
        y = layer(x)
        y.retain_grad()
        (y * y.detach()).sum().backward()
        return [y.grad]

    def another_branch_reads_it(layer, x):  # y + w: the add hands one gradient to both branches
        h = (x.detach() * 2).requires_grad_()
        w = h * 1.5  # made before y, so its backward runs after DyT's: the gradient is still to be read
        y = layer(x)
        ((y + w) * 3).sum().backward()
        return [h.grad]

    def another_branch_read_it(layer, x):  # the same, the other branch's backward first
        h = (x.detach() * 2).requires_grad_()
        y = layer(x)
        w = h * 1.5
        ((y + w) * 3).sum().backward()
        return [h.grad]

    def used_twice(layer, x):
        y = layer(x)
        (y * 2 + y.exp()).sum().backward()
        return []

    def checkpointed(layer, x):
        from torch.utils.checkpoint import checkpoint
        out = [checkpoint(layer, x, use_reentrant=reentrant) for reentrant in (False, True)]
        (out[0] * 2 + out[1] * 3).sum().backward()
        return []

    return [held, hook_keeps_it, retained, another_branch_reads_it, another_branch_read_it, used_twice,
            checkpointed]


@pytest.mark.parametrize("scenario", _visible_gradient_scenarios(), ids=lambda f: f.__name__)
def test_a_gradient_seen_elsewhere_is_never_written_over(gradient_reuse, scenario):
    """Held by the caller, kept by a hook, retained, still to be read by another branch: the
    gradients and every tensor the caller sees are the same with reuse on as with it off."""
    results = {}
    for reuse in (True, False):
        gradient_reuse(reuse)
        torch.manual_seed(9)
        layer = DyT(24, backend="cpu")
        x = torch.randn(10, 24, requires_grad=True)
        seen = scenario(layer, x)
        results[reuse] = [x.grad, *(p.grad for p in layer.parameters()), *seen]
    for with_reuse, without in zip(results[True], results[False], strict=True):
        assert torch.equal(with_reuse, without)


@pytest.mark.parametrize("upstream", ["s + y", "y alone", "s and y apart"])
def test_residual_dyt_gradients_with_the_reuse_on_and_off(gradient_reuse, upstream):
    """ds and dy may be one tensor (s + y), dy may come alone, or both owned: dx is the same."""
    results = {}
    for reuse in (True, False):
        gradient_reuse(reuse)
        torch.manual_seed(10)
        layer = ResidualDyT(24, backend="cpu")
        x, r = torch.randn(10, 24, requires_grad=True), torch.randn(10, 24, requires_grad=True)
        s, y = layer(x, r)
        if upstream == "s + y":
            loss = ((s + y) * 2).sum()
        elif upstream == "y alone":
            loss = (y * y.detach()).sum()
        else:
            loss = (s * 3).sum() + (y * 2).sum()
        loss.backward()
        results[reuse] = [x.grad, r.grad, *(p.grad for p in layer.parameters())]
    for with_reuse, without in zip(results[True], results[False], strict=True):
        assert torch.equal(with_reuse, without)


def test_the_held_gradient_is_left_as_it_was(gradient_reuse):
    gradient_reuse(True)
    dy = torch.randn(10, 24)
    before = dy.clone()
    DyT(24, backend="cpu")(torch.randn(10, 24, requires_grad=True)).backward(dy)
    assert torch.equal(dy, before)


def test_non_contiguous_input():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(9, 40, generator=g)
    _check_against_reference(*_leaves(base[:, :33].detach(), 33, g))  # row stride 40: read in place
    _check_against_reference(*_leaves(torch.randn(33, 9, generator=g).t(), 33, g))  # transposed: copied
    images = torch.randn(2, 5, 3, 4, generator=g)  # channels first
    _check_against_reference(*_leaves(images, 5, g), channels_last=False)


def test_non_contiguous_bfloat16_rows():
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(17, 200, generator=g) * 3).to(torch.bfloat16)
    _check_against_reference(*_leaves(base[::2, 3:180].detach(), 177, g), tol=TOL[torch.bfloat16])


def test_empty_input(kernels):
    y = DyT(6, backend="cpu")(torch.randn(0, 6, requires_grad=True))
    assert y.shape == (0, 6)
    # The kernels themselves (dyt() skips them for empty input): zero gradients, not garbage.
    x = torch.empty(0, 6)
    alpha, weight, bias = torch.tensor([0.5]), torch.randn(6), torch.randn(6)
    y, s = kernels.forward(x, torch.empty(0, 6), alpha, weight, bias)
    assert y.shape == s.shape == (0, 6)
    dx, dalpha, dweight, dbias = kernels.backward(torch.empty(0, 6), x, alpha, weight, True, None)
    assert dx.shape == (0, 6)
    assert dalpha.item() == 0 and not dweight.any() and not dbias.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saturated_input(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 70, generator=g) * 1e4
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), 8.0, -50.0])
    _check_against_reference(*_leaves(x.to(dtype), 70, g), tol=TOL[dtype])


def test_nan_propagates_to_its_own_outputs_only():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 37, generator=g)
    x[2, 9] = float("nan")
    _check_against_reference(*_leaves(x, 37, g))
    y = dyt_fn(x, torch.tensor([0.5]), torch.ones(37), backend="cpu")
    assert y.isnan().sum() == 1 and y[2, 9].isnan()


def test_tanh_accuracy_against_float64(kernels):
    """The kernel's float32 tanh on a dense grid (and at 0, tiny and huge values), weight 1, no bias:
    max abs error within 5e-7 of float64 (measured 2.6e-7; float32 torch.tanh: 3e-8)."""
    y = torch.cat([torch.linspace(-12, 12, 480_001), torch.linspace(-1e-3, 1e-3, 10_001),
                   torch.tensor([0.0, 1e-30, -1e-30, 3e38, -3e38])])
    got, _ = kernels.forward(y.reshape(1, -1), None, torch.ones(1), torch.ones(y.numel()), None)
    want = torch.tanh(y.double())
    err = (got.reshape(-1).double() - want).abs()
    assert err.max().item() < 5e-7, err.max().item()
    small = y.abs() < 0.1  # relative accuracy near 0, where |tanh| is small
    assert (err[small] / want[small].abs().clamp(min=1e-30)).max().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_a_column_gets_the_same_bits_wherever_it_falls_in_the_row(kernels, dtype):
    """The loops take several vectors a step, then single vectors, then the row's tail: a column's
    y, s, dx, d weight and d bias must not depend on which of those paths computed it (g++ fused
    weight * tanh + bias into one FMA in whole steps only, until dyt_cpu.cpp's fma_barrier). 200
    columns in one call reach whole steps on AVX2 and AVX-512; 7 at a time reach none (only single
    vectors and tails)."""
    g = torch.Generator().manual_seed(9)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    rows, cols, part = 3, 200, 7
    x, r, dy, ds = ((3 * torch.randn(rows, cols, generator=g)).to(dtype) for _ in range(4))
    alpha = torch.tensor([0.7], dtype=params)
    weight, bias = ((3 * torch.randn(cols, generator=g)).to(params) for _ in range(2))

    def run(lo, hi):
        y, s = kernels.forward(x[:, lo:hi], r[:, lo:hi], alpha, weight[lo:hi], bias[lo:hi])
        dx, _, dw, db = kernels.backward(dy[:, lo:hi], s, alpha, weight[lo:hi], True, ds[:, lo:hi])
        return y, s, dx, dw, db

    whole = run(0, cols)
    parts = [run(lo, min(lo + part, cols)) for lo in range(0, cols, part)]
    for name, got, pieces in zip(("y", "s", "dx", "d weight", "d bias"), whole, zip(*parts)):
        assert torch.equal(got, torch.cat(pieces, dim=-1)), name


@pytest.fixture
def streaming_at_any_size(kernels):
    """y streamed from 0 bytes on (``cpu_fused.stream_min_bytes``), put back after the test; skipped
    where the build has no streaming."""
    before = cpu_fused.stream_min_bytes()
    assert cpu_fused.stream_min_bytes(0) == 0
    can_stream = kernels.streams_y(torch.ones(4, 64))
    if not can_stream:
        cpu_fused.stream_min_bytes(before)
        pytest.skip("this build writes y with plain stores only (no AVX2 / AVX-512, or not Linux)")
    yield kernels
    cpu_fused.stream_min_bytes(before)


@pytest.mark.parametrize("layout", ["contiguous", "strided rows", "residual"])
def test_y_written_with_streaming_stores_has_the_same_bits(streaming_at_any_size, layout):
    """A large float32 y on mapped pages goes out through streaming stores in whole steps and plain
    stores for the vectors left over: the same bits as plain stores alone. 208 columns are whole
    cache lines a row, and whole vectors on AVX2 (26: 6 steps of 4, 2 left over) and AVX-512 (13: 3
    steps, 1 left over)."""
    kernels = streaming_at_any_size
    rows, cols = 24, 208
    g = torch.Generator().manual_seed(10)
    wide = 3 * torch.randn(rows, cols + 16, generator=g)
    x = wide[:, :cols] if layout == "strided rows" else wide[:, :cols].contiguous()
    r = torch.randn(rows, cols, generator=g) if layout == "residual" else None
    alpha, weight, bias = torch.tensor([0.7]), 3 * torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    before = kernels.streamed_forwards()
    for _ in range(5):  # y must land on mapped pages: most of a test process's heap has been written
        torch.empty(2 * rows, cols).fill_(0)  # a larger block freed just now, which malloc splits for y
        streamed = kernels.forward(x, r, alpha, weight, bias)
        if kernels.streamed_forwards() > before:
            break
    assert kernels.streamed_forwards() == before + 1
    cpu_fused.stream_min_bytes(2**62)
    plain = kernels.forward(x, r, alpha, weight, bias)
    assert kernels.streamed_forwards() == before + 1
    assert torch.equal(streamed[0], plain[0])
    if r is not None:
        assert torch.equal(streamed[1], plain[1])


def test_y_is_streamed_only_where_it_is_float32_whole_lines_large_and_mapped(streaming_at_any_size):
    """On a fresh mapping (what glibc gives every output above 32 MiB by default) the first write
    faults each page in, zeroed through the cache; streaming y and dx there made the Intel box's
    forward + backward 1.4x slower, so y is streamed only once a page in its middle is mapped."""
    kernels = streaming_at_any_size
    fresh = mmap.mmap(-1, 2**22)  # anonymous: no page mapped until written
    flat = torch.frombuffer(fresh, dtype=torch.float32)
    y = flat.view(1024, 1024)
    assert not kernels.streams_y(y)
    y.fill_(1.0)
    assert kernels.streams_y(y)
    assert not kernels.streams_y(flat[:4000].view(4, 1000))  # rows off the cache line
    assert not kernels.streams_y(flat[8:8 + 64 * 1024].view(64, 1024))  # y itself off the cache line
    assert not kernels.streams_y(flat[:64 * 16].view(64, 16))  # no whole step in a row
    assert not kernels.streams_y(flat[:0].view(0, 1024))
    assert not kernels.streams_y(torch.frombuffer(fresh, dtype=torch.float64).view(512, 1024))
    assert not kernels.streams_y(torch.frombuffer(fresh, dtype=torch.bfloat16).view(2048, 1024))
    cpu_fused.stream_min_bytes(y.numel() * 4 + 1)
    assert not kernels.streams_y(y)
    del y, flat
    fresh.close()


def test_float64_parameters_give_float64_math():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 31, generator=g)
    alpha, weight = torch.tensor([0.7], dtype=torch.float64), torch.randn(31, generator=g, dtype=torch.float64)
    y = dyt_fn(x, alpha, weight, backend="cpu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, dyt_fn(x, alpha, weight, backend="eager"), atol=0, rtol=0)


def test_auto_picks_cpu_at_every_size(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU without Triton's interpreter
    assert dyt.available_backends("cpu") == ["cpu", "compiled", "eager"]
    for numel in (1, 10_000, 2**21, 2**25, None):
        assert dyt.auto_backend("cpu", numel) == "cpu"
    assert dyt.auto_backend("cpu", 10, all_options=True) == "eager"  # squash ablations: not in C++
    with pytest.raises(dyt.BackendUnavailableError, match="'cpu'.*cuda.*CPU tensors"):
        dyt.select_backend("cpu", "cuda")


def test_a_failed_build_names_the_alternatives_and_auto_falls_back(monkeypatch):
    """A build that fails (no compiler, broken toolchain): simulated by a loader that raises."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    def broken_build(level):
        raise cpu_fused.CpuKernelBuildError("building its C++ kernels failed (g++: not found)")

    monkeypatch.setattr(cpu_fused.EXTENSION, "build", broken_build)
    monkeypatch.setattr(cpu_fused.EXTENSION, "built", {})
    with pytest.warns(RuntimeWarning, match="'cpu' DyT backend is unavailable.*'compiled' or 'eager'"):
        assert dyt.auto_backend("cpu", 2**22) == "compiled"
    assert dyt.auto_backend("cpu", 100) == "eager"  # the failure is kept: no second build, no second warning
    with pytest.raises(dyt.BackendUnavailableError,
                       match=r"'cpu' cannot run.*g\+\+: not found.*Usable here: compiled, eager"):
        DyT(4, backend="cpu")(torch.randn(2, 4))
    y = DyT(4)(torch.randn(2, 4))  # auto still runs
    assert y.shape == (2, 4)


def test_a_build_is_named_by_what_makes_it(monkeypatch, tmp_path):
    """Two environments sharing torch's extension cache (another venv: another torch folder) or
    another source or flags get builds of their own, not one folder rebuilt in turn."""
    import torch as torch_module

    flags = ["-O3", "-mavx2"]
    name = cpu_fused.EXTENSION.build_name("AVX2", flags)
    assert name.startswith("dyt_cpu_avx2_") and name == cpu_fused.EXTENSION.build_name("AVX2", list(flags))
    assert cpu_fused.EXTENSION.build_name("AVX2", [*flags, "-g"]) != name
    source = tmp_path / "kernels.cpp"
    source.write_bytes(cpu_fused.EXTENSION.source.read_bytes() + b"\n")
    monkeypatch.setattr(cpu_fused.EXTENSION, "source", source)
    assert cpu_fused.EXTENSION.build_name("AVX2", flags) != name
    monkeypatch.undo()
    monkeypatch.setattr(torch_module, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    assert cpu_fused.EXTENSION.build_name("AVX2", flags) != name


def test_the_lock_file_a_killed_build_left_does_not_stop_later_loads():
    """torch's build lock is a plain file: a build killed midway (a rank's SIGKILL, a Ctrl-C) leaves
    it, and every later process that loads the extension would wait on it forever. The build's own
    kernel lock (dropped with its holder) tells such a leftover from a live build's, and removes it."""
    import contextlib
    import os
    import subprocess
    import sys
    import time

    from dyt.kernels.cpp_build import build_flags, capability, held_build_folder

    extension = cpu_fused.EXTENSION
    folder = extension.build_folder(extension.build_name(capability(), build_flags(capability())))
    baton = folder / "lock"
    with held_build_folder(folder):  # no other process (another test worker) is loading it meanwhile
        baton.touch()  # what torch's FileBaton leaves behind when its holder is killed, here an hour ago
        os.utime(baton, (time.time() - 3600, time.time() - 3600))
    try:
        done = subprocess.run([sys.executable, "-c", "from dyt.kernels.cpu_fused import EXTENSION; EXTENSION.load()"],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        with held_build_folder(folder):  # removes the file: the rest of the suite must not hang on it
            pass
        pytest.fail("the load waited on the leftover lock file")
    assert done.returncode == 0, done.stderr  # its warning names the file removed (unless another worker's load
    # took the kernel lock first and removed it: the same mechanism, so not asserted on this process's stderr)
    with contextlib.suppress(FileNotFoundError):  # gone; or another worker's build holds a new one
        assert baton.stat().st_mtime > time.time() - 1800, "the leftover lock file is still there"


def test_a_young_build_lock_is_waited_on_and_an_old_one_removed(tmp_path, monkeypatch):
    """A ``lock`` file younger than STALE_BUILD_LOCK_S may be a live build's by code that takes no
    kernel lock (an older checkout sharing the cache): removing it would let two builds run at once."""
    import threading
    import time

    from dyt.kernels import cpp_build

    monkeypatch.setattr(cpp_build, "STALE_BUILD_LOCK_S", 1.0)
    baton = tmp_path / "lock"
    baton.touch()
    begun = time.perf_counter()
    cpp_build.clear_stale_build_lock(baton)
    assert not baton.exists() and time.perf_counter() - begun >= 0.9  # waited for it to age, then removed it
    baton.touch()
    released = threading.Timer(0.3, baton.unlink)  # its holder finishes and removes it itself
    released.start()
    begun = time.perf_counter()
    cpp_build.clear_stale_build_lock(baton)
    released.join()
    assert time.perf_counter() - begun < 0.9


def test_a_built_extension_loads_in_a_new_process_without_cpp_extension():
    """Once a build is stamped (the module fixture's load stamps it, if no earlier load did), a new
    process imports the library itself: no ninja run, no setuptools or hipify import (~0.7 s of a
    process that loads them, measured alone), and the kernels run."""
    code = ("import sys, torch\nfrom dyt.kernels.cpu_fused import EXTENSION\nx = torch.randn(3, 5)\n"
            "y = EXTENSION.load().dyt(x, torch.tensor(0.5), torch.ones(5), torch.zeros(5))\n"
            "assert torch.allclose(y, torch.tanh(0.5 * x), atol=1e-6)\n"
            "print('torch.utils.cpp_extension' in sys.modules)")
    assert _stdout_of_a_new_process(code).split() == ["False"], "the built extension was loaded through cpp_extension"


def test_a_stamp_is_trusted_only_for_its_own_build_and_library(tmp_path):
    """load_built imports what record_built stamped, and nothing else: not for another build, not a
    library rewritten or touched since, not while torch's lock file is there, not a library gone.
    (A Python file stands in for the built library: the same import machinery loads either.)"""
    import os
    import types

    from dyt.kernels import cpp_build

    library = tmp_path / "stand_in_kernels.py"
    library.write_text("VALUE = 1\n")
    cpp_build.record_built(tmp_path, types.SimpleNamespace(__file__=str(library), __name__="stand_in_kernels"),
                           made_of="build-a")
    assert cpp_build.load_built(tmp_path, "build-a").VALUE == 1
    assert cpp_build.load_built(tmp_path, "build-b") is None  # another build's stamp
    (tmp_path / "lock").touch()
    assert cpp_build.load_built(tmp_path, "build-a") is None  # a build is running, or a killed one left it
    (tmp_path / "lock").unlink()
    stat = library.stat()
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cpp_build.load_built(tmp_path, "build-a") is None  # rebuilt in place since (same size)
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cpp_build.load_built(tmp_path, "build-a") is not None
    library.write_text("VALUE = 22\n")
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cpp_build.load_built(tmp_path, "build-a") is None  # another size
    library.unlink()
    assert cpp_build.load_built(tmp_path, "build-a") is None
    assert cpp_build.load_built(tmp_path / "never-built", "build-a") is None
    library.write_text("raise ImportError('a library that does not load')\n")
    cpp_build.record_built(tmp_path, types.SimpleNamespace(__file__=str(library), __name__="stand_in_kernels"),
                           made_of="build-a")
    assert cpp_build.load_built(tmp_path, "build-a") is None  # the full load then says why


def test_a_stamped_build_loads_from_wherever_the_cache_moved(tmp_path):
    """The stamp names its library relative to the folder: a cache copied or moved elsewhere (with
    its files' times, as ``cp -a`` keeps them) still loads without cpp_extension."""
    import shutil
    import types

    from dyt.kernels import cpp_build

    built = tmp_path / "built"
    built.mkdir()
    (built / "stand_in_moved.py").write_text("VALUE = 3\n")
    cpp_build.record_built(built, types.SimpleNamespace(__file__=str(built / "stand_in_moved.py"),
                                                        __name__="stand_in_moved"), made_of="build-a")
    shutil.copytree(built, tmp_path / "moved")
    shutil.rmtree(built)
    assert cpp_build.load_built(tmp_path / "moved", "build-a").VALUE == 3


def test_a_stamped_load_waits_while_a_build_holds_the_folder(tmp_path):
    """A build (the kernel lock held exclusively) may be rewriting the library: a load of the stamped
    build waits for it instead of importing a half-written file."""
    import threading
    import time
    import types

    from dyt.kernels import cpp_build

    (tmp_path / "stand_in_waiting.py").write_text("VALUE = 4\n")
    cpp_build.record_built(tmp_path, types.SimpleNamespace(__file__=str(tmp_path / "stand_in_waiting.py"),
                                                           __name__="stand_in_waiting"), made_of="build-a")
    loaded = []
    with cpp_build.held_build_folder(tmp_path):
        loader = threading.Thread(target=lambda: loaded.append(cpp_build.load_built(tmp_path, "build-a")))
        loader.start()
        time.sleep(0.3)
        assert loader.is_alive() and not loaded, "the load did not wait for the build"
    loader.join(timeout=10)
    assert loaded and loaded[0].VALUE == 4


def test_the_build_folder_is_cpp_extensions_own(monkeypatch, tmp_path):
    """CpuExtension.build_folder writes out cpp_extension's rule so that a load need not import it:
    the two must name the same folder, with TORCH_EXTENSIONS_DIR and with its default."""
    from pathlib import Path

    from torch.utils import cpp_extension

    from dyt.kernels.cpp_build import CpuExtension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert CpuExtension.build_folder("dyt_rule_check") == Path(cpp_extension._get_build_directory("dyt_rule_check",
                                                                                                  False))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    folder = CpuExtension.build_folder("dyt_rule_check")
    existed = folder.exists()
    try:
        assert folder == Path(cpp_extension._get_build_directory("dyt_rule_check", False))
    finally:
        if not existed:
            folder.rmdir()  # cpp_extension made it


def test_no_compiler_at_all(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("dyt.backends._have_cpp_compiler", lambda: False)
    assert dyt.auto_backend("cpu", 2**22) == "eager"
    with pytest.raises(dyt.BackendUnavailableError, match=r"'cpu'.*needs? a C\+\+ compiler.*Usable here: eager"):
        dyt.select_backend("cpu", "cpu")


def test_the_ninja_wheel_is_found_when_its_folder_is_off_path(monkeypatch, tmp_path):
    """A venv's python run without activating the venv: the wheel's ninja is beside the scripts,
    not on PATH, and cpp_extension looks on PATH only."""
    import os
    import shutil

    from dyt.kernels import cpp_build

    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("ninja") is None
    cpp_build.put_ninja_wheel_on_path()
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")


def test_the_gradient_reuse_script_runs():
    """scripts/bench_gradient_reuse.py at a tiny shape: every op timed, the DyT gradients checked equal."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_gradient_reuse.py"
    done = subprocess.run([sys.executable, str(script), "--shape", "16x8", "--rounds", "1", "--warmup", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("F.layer_norm", "F.rms_norm", "DyT cpu, dx over the gradient", "DyT cpu, dx a new tensor"):
        assert row in done.stdout


def test_the_kernel_ab_script_runs():
    """scripts/bench_cpu_kernel_ab.py at a tiny shape, the current kernels as the "old" ones (the same
    build): every output of the check cases the same bits, both timed beside F.layer_norm, their
    gradients equal."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_cpu_kernel_ab.py"
    done = subprocess.run([sys.executable, str(script), "--old", str(cpu_fused.SOURCE), "--shape", "16x8",
                           "--rounds", "1", "--warmup", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "new / old" in done.stdout and "0.00e+00, 0.00e+00, 0.00e+00, 0.00e+00" in done.stdout, done.stdout
    assert "the same bits in all 224 cases" in done.stdout, done.stdout
    for row in ("DyT cpu (new)", "DyT cpu (old)", "F.layer_norm"):
        assert row in done.stdout


def test_double_backward():
    """Under create_graph the cpu backend's gradients are differentiable (before, a second backward
    silently left DyT out: x.grad of sum(dyt(x) + x**2)'s gradient came out as 2 everywhere)."""
    check_double_backward("cpu")


def test_the_reference_count_is_measured_when_first_used_under_inference_mode():
    """The measurement at import runs autograd; a first use under inference_mode (or no_grad) must
    not make it fail and turn the reuse off for the process."""
    code = ("import torch\nfrom dyt.functional import dyt\nfrom dyt.kernels import cpu_fused\n"
            "with torch.inference_mode():\n"
            "    dyt(torch.randn(4, 8), torch.tensor([0.5]), torch.ones(8), backend='cpu')\n"
            "print(cpu_fused.load().owned_gradient_refs(), cpu_fused.reuse_gradient_buffers())\n")
    refs, enabled = _stdout_of_a_new_process(code).split()[-2:]
    assert int(refs) > 0 and enabled == "True"


@pytest.mark.parametrize(("env", "elements"), [
    ({}, 32768),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, 2**18),
    ({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "10k"}, 32768),  # libgomp: the spin count wins
    ({"GOMP_SPINCOUNT": "0"}, 2**18),
], ids=["spin", "passive", "passive-but-spincount", "spincount-0"])
def test_threads_follow_how_idle_openmp_threads_wait(env, elements):
    """Where idle threads sleep, waking one costs more than a second thread saves on small inputs, so a
    task needs 2**18 elements there; the kernels stay right on either side (300 x 400 and 1000 x 77,
    every dtype: one task where threads sleep, several where they spin; the rest of this file runs
    where they sleep, tests/conftest.py)."""
    import os

    code = ("import torch\nfrom dyt.kernels import cpu_fused\nfrom dyt.selfcheck import check_dyt, check_residual_dyt\n"
            "torch.set_num_threads(2)\n"
            "for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):\n"
            "    for shape in ((300, 400), (1000, 77)):\n"
            "        check_dyt('cpu', dtype, shape, True)\n"
            "        check_residual_dyt('cpu', dtype, shape, True)\n"
            "print(cpu_fused.task_elements())\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert int(_stdout_of_a_new_process(code, env={**clean, **env}).split()[-1]) == elements


def test_tracers_transforms_and_forward_ad_get_the_formula_not_the_kernel():
    """The C++ kernels write through data pointers no tracer sees: ``torch.jit.trace`` and
    ``make_fx`` of a cpu-backend DyT recorded a bare ``aten::empty`` and returned uninitialised
    memory; ``torch.func`` transforms and forward-mode AD refused the C++ autograd Function. Under
    each, every backend now runs the eager formula, whose values the kernels match."""
    from torch.autograd import forward_ad
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    layer, residual_layer = DyT(16, backend="cpu", alpha_init=0.7), ResidualDyT(16, backend="cpu")
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    x, r = torch.randn(6, 16), torch.randn(6, 16)
    expected = layer.weight * torch.tanh(layer.alpha * x) + layer.bias
    traced = torch.jit.trace(layer, x, check_trace=False)
    graphed = make_fx(layer)(x)
    assert "tanh" in str(traced.graph) and "tanh" in str(graphed.graph)
    other = torch.randn(6, 16)  # the graphs compute, not replay
    for run in (traced, graphed):
        torch.testing.assert_close(run(x), expected)
        torch.testing.assert_close(run(other), layer(other))
    torch.testing.assert_close(make_fx(residual_layer)(x, r)(other, r), residual_layer(other, r))
    stacked = torch.randn(3, 6, 16)
    torch.testing.assert_close(torch.func.vmap(layer)(stacked), layer(stacked))
    per_sample = torch.func.vmap(torch.func.grad(lambda v: layer(v).sum()))(x)
    torch.testing.assert_close(per_sample, layer.weight * layer.alpha * (1 - torch.tanh(layer.alpha * x) ** 2))
    with forward_ad.dual_level():
        out = layer(forward_ad.make_dual(x, torch.ones_like(x)))
        tangent = forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, layer.weight * layer.alpha * (1 - torch.tanh(layer.alpha * x) ** 2))


def test_a_traced_dyt_warns_nothing_and_generalises_to_other_batches():
    """Every size is a tensor under ``torch.jit.trace``, so DyT's shape checks and branches gave 4
    TracerWarnings per layer traced (a model, dozens), each saying the trace might not generalise.
    Their answers are fixed by the parameters' shapes, so none is shown; the traced graph still
    computes for other batch shapes, and a warning from the caller's own code still shows."""
    torch.manual_seed(0)
    layers = {
        "channels last": (DyT(16, backend="cpu", alpha_init=0.7), torch.randn(2, 6, 16), torch.randn(5, 3, 16)),
        "per-channel alpha": (DyT(16, alpha_shape="channel"), torch.randn(6, 16), torch.randn(9, 16)),
        "channels first": (DyT(8, channels_last=False), torch.randn(2, 8, 5), torch.randn(3, 8, 7)),
        "trailing shape, no bias": (DyT((4, 8), bias=False), torch.randn(3, 4, 8), torch.randn(1, 2, 4, 8)),
    }
    for name, (layer, example, other) in layers.items():
        with torch.no_grad():
            layer.weight.normal_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            traced = torch.jit.trace(layer, example)
        torch.testing.assert_close(traced(other), layer(other), msg=name)
    residual_layer, x, r = ResidualDyT(16, backend="cpu"), torch.randn(6, 16), torch.randn(6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = torch.jit.trace(residual_layer, (x, r))
    other = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    for got, expected in zip(traced(*other), residual_layer(*other)):
        torch.testing.assert_close(got, expected)

    class Branching(torch.nn.Module):  # the caller's own data-dependent branch around a DyT
        def __init__(self):
            super().__init__()
            self.norm = DyT(16)

        def forward(self, x):
            return self.norm(x) if x.sum() > 0 else -self.norm(x)

    with pytest.warns(torch.jit.TracerWarning):
        torch.jit.trace(Branching(), torch.ones(2, 16))


def test_a_channels_first_result_comes_back_in_the_layout_eager_gives():
    """The cpu backend transposes channels-first input for its kernel; it returned the transposed
    layout, so ``y.view(...)`` worked on eager and failed on the default backend. A contiguous input
    gives a contiguous result, and one stored channels-last keeps its strides, as on eager."""
    layer, eager = DyT(8, channels_last=False, backend="cpu"), DyT(8, channels_last=False, backend="eager")
    for x in (torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)):
        y, expected = layer(x), eager(x)
        assert y.stride() == expected.stride(), (y.stride(), expected.stride())
        torch.testing.assert_close(y, expected)
    assert layer(torch.randn(2, 8, 3, 3)).view(2, -1).shape == (2, 72)
