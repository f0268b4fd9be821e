"""The DyT layer and functional against a float64 reference, on every backend that runs here: on
CUDA when there is one (fused included), else on CPU (fused is tested in test_fused.py)."""

import pytest
import torch

import dyt
from dyt import DyT
from dyt.functional import dyt as dyt_fn
from dyt.selfcheck import TOL, assert_grad_close, check_dyt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["eager", "compiled"] + (["fused"] if DEVICE == "cuda" else [])  # fused on CPU: test_fused.py


def _grads_vs_reference(reference, x, alpha, weight, bias, channels_last, backend, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, alpha, weight)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = dyt_fn(*leaves, b, channels_last=channels_last, backend=backend)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, alpha, weight)]
    ref_b = None if bias is None else bias.detach().double().requires_grad_()
    y_ref = reference(*ref_leaves, ref_b, channels_last=channels_last)
    y_ref.backward(dy.double())
    got = [t.grad for t in leaves] + ([] if b is None else [b.grad])
    want = [t.grad for t in ref_leaves] + ([] if ref_b is None else [ref_b.grad])
    return y, y_ref, got, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("channels", [1, 7, 1023, 4097])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(backend, dtype, channels, with_bias):
    check_dyt(backend, dtype, (3, 5, channels), with_bias, DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_reference_with_parameters_in_half_precision(backend, dtype):
    """DeepSpeed's bf16 / fp16 engines hold alpha, weight and bias in that dtype, not float32."""
    check_dyt(backend, dtype, (3, 5, 300), True, DEVICE, params_in_dtype=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_first(reference, backend):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 40, 33, generator=g).to(DEVICE)
    x = base.transpose(1, 2)[:, ::2]  # (6, 17, 40), non-contiguous
    assert not x.is_contiguous()
    alpha, weight, bias = (t.to(DEVICE) for t in (torch.tensor([0.5]), torch.randn(40, generator=g), torch.randn(40, generator=g)))
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    y, y_ref, got, want = _grads_vs_reference(reference, x, alpha, weight, bias, True, backend, dy)
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=2e-6, rtol=2e-6)
    for gv, wv in zip(got, want):
        assert_grad_close(gv, wv, 2e-5)

    images = torch.randn(2, 5, 4, 3, generator=g).to(DEVICE)  # (batch, channels, h, w)
    cw, cb = torch.randn(5, generator=g).to(DEVICE), torch.randn(5, generator=g).to(DEVICE)
    dy = torch.randn(images.shape, generator=g).to(DEVICE)
    y, y_ref, got, want = _grads_vs_reference(reference, images, alpha, cw, cb, False, backend, dy)
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=2e-6, rtol=2e-6)
    for gv, wv in zip(got, want):
        assert_grad_close(gv, wv, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_gradcheck_float64(backend, channels_last):
    g = torch.Generator().manual_seed(2)
    shape = (3, 4, 6) if channels_last else (3, 6, 4)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    alpha = torch.tensor([0.8], dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: dyt_fn(*t, channels_last=channels_last, backend=backend), (x, alpha, w, b)
    )


@pytest.mark.parametrize(
    "backend, dtype",
    [(b, d) for b in ("eager", "compiled", "fused") for d in (torch.float32, torch.float64)],
    ids=str,
)
def test_saturated_inputs(reference, backend, dtype):
    """Far into tanh's tails (incl. |alpha x| in 43.6..51.9, where exp(-2|y|) is a float32
    subnormal): outputs are exactly +-weight and gradients match the reference."""
    x = torch.tensor([[-1e4, -47.0, -30.0, -21.0, 21.0, 30.0, 47.0, 1e4]], dtype=dtype, device=DEVICE)
    alpha = torch.tensor([1.0], dtype=dtype, device=DEVICE)
    weight = torch.linspace(0.5, 2.0, 8, dtype=dtype, device=DEVICE)
    dy = torch.ones_like(x)
    y, y_ref, got, want = _grads_vs_reference(reference, x, alpha, weight, None, True, backend, dy)
    assert torch.equal(y, weight * x.sign())
    for name, gv, wv in zip(["x", "alpha", "weight"], got, want):
        assert_grad_close(gv, wv, 1e-6, what=f"grad {name}")
    special = dyt_fn(torch.tensor([[-float("inf"), float("inf"), float("nan")]], dtype=dtype, device=DEVICE), alpha, weight[:3],
                     None, backend=backend)
    assert torch.equal(special[0, :2], torch.stack([-weight[0], weight[1]]))
    assert special[0, 2].isnan()  # a NaN must reach the loss, never be clamped into +-1


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_input(backend):
    layer = DyT(8, backend=backend, device=DEVICE)
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert layer.weight.grad.abs().sum() == 0


def test_frozen_parameters_get_no_gradient():
    layer = DyT(16, backend="compiled", device=DEVICE)
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and layer.bias.grad is not None


def test_compiled_backend_does_not_recompile_for_new_lengths():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    start = counters["stats"]["unique_graphs"]
    layer = DyT(32, backend="compiled", device=DEVICE)
    layer(torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)).sum().backward()
    layer(torch.randn(2, 10, 32, device=DEVICE, requires_grad=True)).sum().backward()  # first dynamic-shape compile
    before = counters["stats"]["unique_graphs"]
    assert before > start  # it did compile (a silent fall back to eager would leave the count flat)
    for length in (11, 57, 300, 1001):
        layer(torch.randn(2, length, 32, device=DEVICE, requires_grad=True)).sum().backward()
    assert counters["stats"]["unique_graphs"] == before


def test_state_dict_uses_the_papers_names():
    # The reference DynamicTanh stores alpha [1], weight and bias under exactly these names.
    paper_state = {"alpha": torch.tensor([0.8]), "weight": torch.randn(10), "bias": torch.randn(10)}
    layer = DyT(10)
    layer.load_state_dict(paper_state)
    assert set(layer.state_dict()) == {"alpha", "weight", "bias"}
    assert layer.alpha.shape == (1,)
    torch.testing.assert_close(layer.weight, paper_state["weight"])
    no_bias = DyT(10, bias=False)
    assert set(no_bias.state_dict()) == {"alpha", "weight"}
    x = torch.randn(3, 10)
    torch.testing.assert_close(no_bias(x), torch.tanh(0.5 * x))


def test_module_init_and_repr():
    layer = DyT(12, alpha_init=0.2, bias=False, channels_last=False, backend="eager")
    assert layer.alpha.item() == pytest.approx(0.2)
    assert torch.equal(layer.weight, torch.ones(12))
    assert "channels_last=False" in repr(layer) and "backend='eager'" in repr(layer)
    with pytest.raises(ValueError, match="one channel count"):
        DyT((3, 4), channels_last=False)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_dyt_into_linears(with_bias):
    torch.manual_seed(0)
    norm = DyT(24, alpha_init=0.7, bias=with_bias)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if with_bias:
            norm.bias.uniform_(-0.5, 0.5)
    q, k = torch.nn.Linear(24, 8), torch.nn.Linear(24, 6, bias=False)
    tanh_only, (q2, k2) = dyt.fold_dyt(norm, q, k)
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(q2(tanh_only(x)), q(norm(x)), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k2(tanh_only(x)), k(norm(x)), atol=1e-6, rtol=1e-6)
    assert (k2.bias is not None) == with_bias
    with pytest.raises(ValueError, match="does not take"):
        dyt.fold_dyt(norm, torch.nn.Linear(5, 2))


def test_the_folded_tanh_computes_in_float32_for_half_precision_input():
    """``ScaledTanh`` rounded ``alpha * x`` to bf16 before the tanh: twice the error of the DyT it
    stands for (whose math runs in float32); it now gives the float32 tanh rounded once."""
    norm = DyT(256, alpha_init=0.37).to(torch.bfloat16)
    tanh_only, _ = dyt.fold_dyt(norm, torch.nn.Linear(256, 4).to(torch.bfloat16))
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    once = torch.tanh(norm.alpha.float() * x.float()).to(torch.bfloat16)
    got = tanh_only(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, once)


def test_fold_dyt_refuses_what_folding_would_change():
    """Folding assumes each consumer computes x W^T + b and that the DyT has one output."""

    class ScaledLinear(torch.nn.Linear):  # a forward of its own: not x W^T + b
        def forward(self, x):
            return 2 * super().forward(x)

    class PlainSubclass(torch.nn.Linear):  # nn.Linear's own forward: folds as one
        pass

    with pytest.raises(ValueError, match="ScaledLinear: it overrides nn.Linear.forward"):
        dyt.fold_dyt(DyT(4), torch.nn.Linear(4, 2), ScaledLinear(4, 2))
    with pytest.raises(ValueError, match="cannot fold a ResidualDyT: it also returns the residual sum"):
        dyt.fold_dyt(dyt.ResidualDyT(4), torch.nn.Linear(4, 2))
    norm, linear = DyT(4), PlainSubclass(4, 2)
    tanh_only, (folded,) = dyt.fold_dyt(norm, linear)
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(tanh_only(x)), linear(norm(x)))


@pytest.mark.parametrize("build, error, message", [
    (lambda: DyT(0), ValueError, "positive channel count"),
    (lambda: DyT(-3), ValueError, "positive channel count"),
    (lambda: DyT(4.0), ValueError, "positive channel count"),
    (lambda: DyT([]), ValueError, "positive channel count"),
    (lambda: DyT(True), ValueError, "positive channel count"),
    (lambda: DyT((4, 0)), ValueError, "positive channel count"),
    (lambda: DyT(4, alpha_init=float("nan")), ValueError, "alpha_init must be a positive number"),
    (lambda: DyT(4, alpha_init=0), ValueError, "alpha_init must be a positive number"),
    (lambda: DyT(4, alpha_init=-1), ValueError, "alpha_init must be a positive number"),
    (lambda: DyT(4, learnable_alpha="no"), TypeError, "learnable_alpha must be True or False"),
    (lambda: DyT(4, bias="false"), TypeError, "bias must be True or False"),
    (lambda: DyT(4, dtype=torch.int64), TypeError, "floating-point dtype"),
    (lambda: dyt.make_norm("dyt", 4, role="bogus"), ValueError, "unknown role 'bogus'"),
    (lambda: dyt.make_norm("layernorm", 0), ValueError, "positive channel count"),
    (lambda: dyt.make_norm(None, 4), TypeError, "NormConfig or a norm kind"),
    (lambda: dyt.NormConfig(kind="dyt", bias="false"), ValueError, "bias must be true or false"),
    (lambda: dyt.NormConfig(alpha_init=0.5), ValueError, "alpha_init must map roles"),
    (lambda: dyt.NormConfig(eps="1e-5"), ValueError, "eps must be a positive number"),
    (lambda: dyt.fold_dyt(torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)), TypeError, "folds a dyt.DyT, not LayerNorm"),
    (lambda: dyt.fold_dyt(DyT(4), [torch.nn.Linear(4, 2)]), TypeError, "given one by one, not list"),
    (lambda: dyt.convert_norms(torch.nn.LayerNorm(4), {"kind": "dyt"}), TypeError, "a NormConfig or a norm kind"),
], ids=lambda v: "" if callable(v) or isinstance(v, type) else v)
def test_bad_arguments_are_refused_where_they_are_given(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_numpy_scalars_are_numbers_to_the_layer_and_the_config():
    """An alpha0 or eps taken from a numpy array (a sweep's ``np.linspace``) was refused as 'not a
    positive number' unless it was float64; the config stores plain floats, which its YAML can write."""
    import numpy as np

    from dyt.train.config import dump_yaml

    for value in (np.float32(0.25), np.float64(0.25), np.int64(2)):
        assert DyT(4, alpha_init=value).alpha_init == float(value)
        config = dyt.NormConfig(kind="dyt", alpha_init={"ffn": value}, eps=value)
        assert type(config.alpha_init["ffn"]) is float and type(config.eps) is float
        assert dump_yaml(config) == dump_yaml(dyt.NormConfig(kind="dyt", alpha_init={"ffn": float(value)}, eps=float(value)))
    for bad in (np.bool_(True), True, np.float32("nan"), np.int64(0)):
        with pytest.raises(ValueError, match="must be a positive number"):
            DyT(4, alpha_init=bad)
        with pytest.raises(ValueError, match="must be a positive number"):
            dyt.NormConfig(kind="dyt", alpha_init={"ffn": bad})


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_bad_operands_are_refused_before_any_backend(backend):
    x, w = torch.randn(2, 4), torch.ones(4)
    with pytest.raises(TypeError, match="floating-point input, got torch.int64"):
        DyT(4, backend=backend)(torch.ones(2, 4, dtype=torch.long))  # eager gave rounded zeros
    with pytest.raises(TypeError, match="tensors for x, alpha and weight"):
        dyt_fn(x, 0.5, w, backend=backend)
    with pytest.raises(ValueError, match=r"bias shape \(2, 2\) differs"):
        dyt.functional.residual_dyt(x, x, torch.ones(1), w, torch.zeros(2, 2), backend=backend)
    with pytest.raises(ValueError, match="residual NoneType"):
        dyt.ResidualDyT(4, backend=backend)(x, None)


def test_shape_errors_are_clear():
    layer = DyT(8)
    with pytest.raises(ValueError, match=r"trailing dims \(8,\)"):
        layer(torch.randn(2, 16))  # 16 is a multiple of 8: must not be silently reshaped
    with pytest.raises(ValueError, match="channels-first"):
        DyT(8, channels_last=False)(torch.randn(2, 4, 8))


def test_backend_selection_and_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU without Triton's interpreter
    assert dyt.select_backend("auto", "cpu").name == "cpu"  # the C++ kernels (test_cpu_fused.py)
    big = dyt.backends.CPU_COMPILED_MIN_ELEMENTS
    assert dyt.select_backend("auto", "cpu", big - 1).name == "cpu"
    assert dyt.select_backend("compiled", "cpu", 8).name == "compiled"  # a named backend is kept
    assert dyt.available_backends("cpu") == ["cpu", "compiled", "eager"]
    with pytest.raises(dyt.BackendUnavailableError, match=r"'fused'.*cpu.*Usable here: cpu, compiled, eager"):
        dyt.select_backend("fused", "cpu")
    with pytest.raises(dyt.BackendUnavailableError):
        DyT(4, backend="fused")(torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown DyT backend 'triton'; choose one of auto, eager"):
        DyT(4, backend="triton")
    monkeypatch.setattr("dyt.kernels.cpu_fused.build_error", lambda: "simulated build failure")
    assert dyt.select_backend("auto", "cpu", big).name == "compiled"  # without the cpu kernels
    assert dyt.select_backend("auto", "cpu", big - 1).name == "eager"  # per-call overhead wins
    monkeypatch.setattr("dyt.backends._have_cpp_compiler", lambda: False)
    assert dyt.select_backend("auto", "cpu").name == "eager"
    with pytest.raises(dyt.BackendUnavailableError, match="C\\+\\+ compiler"):
        dyt.select_backend("compiled", "cpu")


def test_process_wide_default(monkeypatch):
    monkeypatch.setenv("DYT_BACKEND", "eager")
    assert dyt.default_backend() == "eager"
    with dyt.use_backend("compiled"):
        assert dyt.default_backend() == "compiled"
        assert dyt.select_backend(None, "cpu").name == "compiled"
    assert dyt.default_backend() == "eager"
    monkeypatch.setenv("DYT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown DyT backend 'bogus'"):
        dyt.default_backend()


def test_default_backend_is_used_by_layers(monkeypatch):
    calls = []
    original = dyt.backends.BACKENDS["eager"]
    monkeypatch.setitem(
        dyt.backends.BACKENDS,
        "eager",
        original.__class__("eager", original.summary, original.why_unavailable,
                           lambda *a: calls.append(1) or original.apply(*a)),
    )
    with dyt.use_backend("eager"):
        DyT(4)(torch.randn(2, 4))
    assert calls == [1]


def test_inside_an_outer_torch_compile_the_plain_formula_is_traced(reference):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), DyT(8, backend="compiled")).to(DEVICE)
    compiled = torch.compile(model, dynamic=True)
    x = torch.randn(5, 8, device=DEVICE)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-6)
    compiled(x).sum().backward()
    assert model[1].alpha.grad is not None


def test_selfcheck_runner(capsys):
    """python -m dyt.selfcheck (scripts/gpu_check.sh's correctness step without pytest)."""
    from dyt import selfcheck

    assert selfcheck.main(["--backend", "eager", "--device", DEVICE, "--no-llama"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.rstrip().endswith(" passed, 0 failed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_half_precision_check_catches_a_forward_computed_in_half_precision(dtype):
    """The backends' bf16 / fp16 outputs are checked within one unit in the last place of the float64
    reference (``assert_output_close``); a forward whose math ran in the half dtype, which the old
    absolute tolerance let through, is 70-200 units off and must fail."""
    from dyt.selfcheck import _inputs, assert_output_close, reference

    g, (x,) = _inputs((33, 300), dtype, "cpu", 1)
    alpha, weight, bias = torch.tensor([0.7]), torch.randn(300, generator=g), torch.randn(300, generator=g)
    want = reference(x, alpha, weight, bias)
    assert_output_close((weight * torch.tanh(alpha * x.float()) + bias).to(dtype), want, dtype)  # float32 math
    in_half = weight.to(dtype) * torch.tanh(alpha.to(dtype) * x) + bias.to(dtype)
    torch.testing.assert_close(in_half.double(), want, atol=TOL[dtype]["atol"], rtol=TOL[dtype]["rtol"])  # passed
    with pytest.raises(AssertionError, match="times the bound of one"):
        assert_output_close(in_half, want, dtype)


def test_dyt_runs_on_dtensors_as_the_norms_it_replaces_do(tmp_path):
    """Under torch's tensor parallelism (``SequenceParallel``, ``distribute_module``) a DyT gets
    DTensors: it reshaped them to rows of channels for its kernels, which their sharding refused
    ("Sharding propagation failed"), and the C++ kernel read no data ("its data is not allocated
    yet"), where nn.LayerNorm and nn.RMSNorm run. Each backend now gives the plain formula's values
    and gradients there (one process: a 1-rank gloo group, in a process of its own)."""
    import subprocess
    import sys

    script = f"""
import copy, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module
from dyt import DyT, ResidualDyT
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
torch.manual_seed(0)
x = torch.randn(2, 4, 8)
for backend in ("eager", "compiled", "cpu", "auto"):
    plain = DyT(8, backend="eager", alpha_init=0.7)
    with torch.no_grad():
        plain.weight.normal_(), plain.bias.normal_()
    layer = copy.deepcopy(plain)
    layer.backend = backend
    parallel = parallelize_module(torch.nn.Sequential(layer), mesh, {{"0": SequenceParallel()}})
    y = parallel(x)
    expected = plain(x)
    torch.testing.assert_close(y.full_tensor(), expected)
    y.full_tensor().square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(layer.weight.grad.full_tensor(), plain.weight.grad)
    torch.testing.assert_close(layer.alpha.grad.full_tensor(), plain.alpha.grad)
first = DyT(8, channels_last=False, backend="cpu")
plain = copy.deepcopy(first)
distribute_module(first, mesh)
images = torch.randn(2, 8, 3, 5)
torch.testing.assert_close(first(distribute_tensor(images, mesh, [Replicate()])).full_tensor(), plain(images))
residual = ResidualDyT(8, backend="cpu")
plain = copy.deepcopy(residual)
distribute_module(residual, mesh)
s, y = residual(*(distribute_tensor(t, mesh, [Replicate()]) for t in (x, 2 * x)))
torch.testing.assert_close(y.full_tensor(), plain(x, 2 * x)[1])
dist.destroy_process_group()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
