"""The fused (Triton) backend, on CUDA when there is one. Without a GPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set before the kernels are imported): slow, so shapes stay small but odd."""

import os

import pytest
import torch

import dyt
from dyt import DyT
from dyt.functional import dyt as dyt_fn
from dyt.selfcheck import (
    LLAMA_SHAPES,
    TOL,
    check_double_backward,
    check_dyt,
    check_residual_dyt,
    check_residual_dyt_one_output,
)

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


@pytest.mark.parametrize("dtype, scale, rtol", [(torch.bfloat16, 1e-8, 1e-2), (torch.float64, 1e-12, 1e-12)],
                         ids=str)  # (float16's own subnormals below 6e-5 lose more than the formula did)
def test_tiny_inputs_keep_their_relative_precision(dtype, scale, rtol, reference):
    """Near 0 the exp form of tanh cancels (relative error ~eps / |y|: bf16 returned 0 below 1e-9);
    each dtype keeps y itself or the polynomial there."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 64, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    alpha, w = torch.tensor([0.5], device=DEVICE), torch.ones(64, dtype=torch.float32, device=DEVICE)
    if dtype == torch.float64:
        w = w.double()
    torch.testing.assert_close(dyt_fn(x, alpha, w, None, backend="fused").double(), reference(x, alpha, w, None),
                               rtol=rtol, atol=0)


def test_float64_weights_give_float64_math_as_every_backend():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 33, generator=g).to(DEVICE)
    alpha, w = torch.tensor([0.9], dtype=torch.float64, device=DEVICE), torch.randn(33, generator=g, dtype=torch.float64).to(DEVICE)
    torch.testing.assert_close(dyt_fn(x, alpha, w, None, backend="fused"), dyt_fn(x, alpha, w, None, backend="eager"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_residual_dyt_squashes_s_as_stored(dtype):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(64, 48, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    alpha, w = torch.tensor([0.7], device=DEVICE), torch.randn(48, generator=g).to(DEVICE)
    s, y = dyt.residual_dyt(x, r, alpha, w, backend="fused")
    assert torch.equal(y, dyt_fn(s, alpha, w, backend="fused"))


def test_residual_dyt_when_one_output_is_used():
    check_residual_dyt_one_output("fused", DEVICE)


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
