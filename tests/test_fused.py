"""The fused (Triton) backend, on CUDA when there is one. Without a GPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set before the kernels are imported): slow, so shapes stay small but odd."""

import os

import pytest
import torch

import dyt
from dyt import DyT, ResidualDyT, fold_dyt
from dyt.functional import dyt as dyt_fn
from dyt.selfcheck import LLAMA_SHAPES, TOL, check_double_backward, check_dyt, check_residual_dyt

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET"

from dyt.kernels import fused  # noqa: E402

SHAPES = [(3, 7), (33, 300), (5, 1023), (2, 4097)]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_fused_matches_float64_reference(dtype, shape, with_bias):
    check_dyt("fused", dtype, shape, with_bias, DEVICE)


def test_fused_non_contiguous_channels_first_and_empty(reference):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(9, 40, generator=g).to(DEVICE)
    x = base[:, :33]  # row stride 40: used in place, no copy
    alpha, w, b = (t.to(DEVICE) for t in (torch.tensor([0.5]), torch.randn(33, generator=g), torch.randn(33, generator=g)))
    torch.testing.assert_close(dyt_fn(x, alpha, w, b, backend="fused").double(), reference(x, alpha, w, b), atol=2e-6, rtol=2e-6)
    xt = torch.randn(33, 9, generator=g).to(DEVICE).t()  # last dim not contiguous: copied
    torch.testing.assert_close(dyt_fn(xt, alpha, w, b, backend="fused").double(), reference(xt, alpha, w, b), atol=2e-6, rtol=2e-6)
    images = torch.randn(2, 5, 3, 4, generator=g).to(DEVICE).requires_grad_()
    cw, cb = torch.randn(5, generator=g).to(DEVICE), torch.randn(5, generator=g).to(DEVICE)
    y = dyt_fn(images, alpha, cw, cb, channels_last=False, backend="fused")
    torch.testing.assert_close(y.double(), reference(images, alpha, cw, cb, channels_last=False), atol=2e-6, rtol=2e-6)
    empty = DyT(6, backend="fused", device=DEVICE)(torch.randn(0, 6, device=DEVICE, requires_grad=True))
    assert empty.shape == (0, 6)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_residual_dyt_forward_and_all_gradients(reference, with_bias):
    g = torch.Generator().manual_seed(3)
    x, r, ds, dy = (torch.randn(7, 300, generator=g).to(DEVICE) for _ in range(4))
    layer = ResidualDyT(300, alpha_init=0.9, bias=with_bias, backend="fused", device=DEVICE)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    eager = ResidualDyT(300, alpha_init=0.9, bias=with_bias, backend="eager", device=DEVICE)
    eager.load_state_dict(layer.state_dict())
    outs = []
    for module in (layer, eager):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        s, y = module(xi, ri)
        torch.autograd.backward([s, y], [ds, dy])
        outs.append((s, y, xi.grad, ri.grad, [p.grad for p in module.parameters()]))
    (s, y, gx, gr, gp), (s0, y0, gx0, gr0, gp0) = outs
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y.double(), reference(x + r, layer.alpha, layer.weight, layer.bias), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(gx, gx0, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gr, gr0, atol=2e-5, rtol=2e-5)
    for a, b in zip(gp, gp0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=2e-5)


def test_residual_dyt_when_only_y_is_used():
    layer = ResidualDyT(16, backend="fused", device=DEVICE)
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    _, y = layer(x, r)
    y.sum().backward()
    torch.testing.assert_close(x.grad, r.grad)


def test_tile_heuristic_is_cached_per_shape_and_dtype():
    fused._tiles.cache_clear()
    for _ in range(3):
        fused._tiles(4096, 2, "cuda", (4096, 8))
    assert fused._tiles.cache_info().misses == 1
    # rows of up to 2048 half or 1024 wider columns, as many rows as fill the tile's elements
    assert fused._tiles(4097, 2, "cuda", (4096, 8)) == (2, 2048, 8)
    assert fused._tiles(4097, 4, "cuda", (4096, 8)) == (4, 1024, 8)
    assert fused._tiles(4097, 2, "cuda", (1024, 4)) == (1, 1024, 4)
    assert fused._tiles(32, 4, "cuda", (4096, 8)) == (64, 32, 8)  # narrow rows: at most 64 of them
    assert fused._tiles.cache_info().misses == 5  # one per (shape, dtype, tile) asked


@pytest.mark.parametrize("interleave", [False, True], ids=["ranges", "interleaved"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
@pytest.mark.parametrize("programs_per_sm", [1, 3, 64])
def test_backward_splits_rows_over_programs_without_changing_the_result(programs_per_sm, prefetch, interleave,
                                                                        reference):
    """The backward's row loop has a run-time bound: any split of rows over programs (ragged last
    block, one program, more programs than row blocks; contiguous ranges or interleaved row blocks),
    with or without prefetching the next row block, gives the same gradients, to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(37, 300, generator=g).to(DEVICE) for _ in range(2))
    alpha = torch.tensor([0.8], device=DEVICE)
    weight = torch.randn(300, generator=g).to(DEVICE)
    want = fused.fused_backward(dy, x, alpha, weight, True)
    got = fused.fused_backward(dy, x, alpha, weight, True, programs_per_sm=programs_per_sm, prefetch=prefetch,
                               interleave=interleave)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x64 = x.double().requires_grad_()
    w64, a64 = weight.double().requires_grad_(), alpha.double().requires_grad_()
    b64 = torch.zeros(300, dtype=torch.float64, device=DEVICE, requires_grad=True)
    reference(x64, a64, w64, b64).backward(dy.double())
    for a, b in zip(got, (x64.grad, a64.grad, w64.grad, b64.grad)):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5)


def test_backend_availability_with_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "fused" in dyt.available_backends("cpu")
    assert dyt.auto_backend("cpu") != "fused"  # auto never picks the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(dyt.BackendUnavailableError, match="need a CUDA device"):
        dyt.select_backend("fused", "cpu")


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_dyt_into_linears(with_bias):
    torch.manual_seed(0)
    norm = DyT(24, alpha_init=0.7, bias=with_bias)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if with_bias:
            norm.bias.uniform_(-0.5, 0.5)
    q, k = torch.nn.Linear(24, 8), torch.nn.Linear(24, 6, bias=False)
    tanh_only, (q2, k2) = fold_dyt(norm, q, k)
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(q2(tanh_only(x)), q(norm(x)), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k2(tanh_only(x)), k(norm(x)), atol=1e-6, rtol=1e-6)
    assert (k2.bias is not None) == with_bias
    with pytest.raises(ValueError, match="does not take"):
        fold_dyt(norm, torch.nn.Linear(5, 2))


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_residual_dyt_matches_float64_reference(dtype, with_bias):
    check_residual_dyt("fused", dtype, (33, 300), with_bias, DEVICE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="LLaMA-size shapes need a GPU")
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_at_llama_shapes_on_gpu(dtype, shape):
    check_dyt("fused", dtype, shape, True, "cuda")


def test_fused_double_backward():
    """As for the cpu backend: differentiable gradients under create_graph."""
    check_double_backward("fused", DEVICE)
