"""The paper's ablations and the normalization-free baselines (issue 14): every DyT variant against
a float64 pure-torch reference (forward and every gradient, odd shapes, eager and compiled), the
baselines' pieces against their definitions, the variant names, and every variant and baseline
built in all four models: norms listed by iter_norms, 10 training steps with a finite loss."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dyt
from dyt import DyT, NormConfig, iter_norms, make_norm, norm_variant_overrides
from dyt.analysis import AlphaTracker, alpha_scale_history, plot_alpha_vs_scale
from dyt.backends import BACKENDS, BackendUnavailableError, auto_backend, select_backend
from dyt.baselines import FixupGate, SkipInitGate, sigma_reparam_layers
from dyt.convert import NormInfo
from dyt.errors import UserInputError
from dyt.functional import dyt as dyt_fn
from dyt.kernels.eager import SQUASHES
from dyt.selfcheck import TOL, assert_grad_close
from dyt.train import load_config

ROOT = Path(__file__).resolve().parents[1]


def reference(x, alpha, weight, bias, squash, channels_last=True):
    """Float64 DyT with any squash, written out independently of dyt.kernels."""
    x, alpha, weight = x.double(), alpha.double(), weight.double()
    bias = None if bias is None else bias.double()
    if not channels_last:  # (batch, channels, ...): parameters broadcast over the trailing dims
        shape = (-1,) + (1,) * (x.ndim - 2)
        alpha = alpha.reshape(shape) if alpha.numel() > 1 else alpha
        weight = weight.reshape(shape)
        bias = None if bias is None else bias.reshape(shape)
    y = alpha * x
    if squash == "tanh":
        f = torch.tanh(y)
    elif squash == "hardtanh":
        f = torch.where(y < -1, -torch.ones_like(y), torch.where(y > 1, torch.ones_like(y), y))
    elif squash == "sigmoid":
        f = 1 / (1 + torch.exp(-y))
    else:
        f = y
    out = weight * f
    return out if bias is None else out + bias


def _check_variant(backend, squash, channel_alpha, shape, channels_last, dtype=torch.float32, with_bias=True):
    g = torch.Generator().manual_seed(sum(shape))
    channels = shape[-1] if channels_last else shape[1]
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = (torch.rand(channels, generator=g) + 0.3 if channel_alpha else torch.tensor([0.7])).to(params)
    weight = torch.randn(channels, generator=g).to(params)
    bias = torch.randn(channels, generator=g).to(params) if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, alpha, weight) + ((bias,) if with_bias else ())]
    y = dyt_fn(leaves[0], leaves[1], leaves[2], leaves[3] if with_bias else None,
               channels_last=channels_last, backend=backend, squash=squash)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = reference(ref[0], ref[1], ref[2], ref[3] if with_bias else None, squash, channels_last)
    y_ref.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=tol["atol"], rtol=tol["rtol"])
    for name, got, want in zip(["x", "alpha", "weight", "bias"], leaves, ref):
        assert got.grad.shape == want.grad.shape, name
        assert_grad_close(got.grad, want.grad, tol["grad"], f"{backend} {squash} grad {name}")


@pytest.mark.parametrize("squash", SQUASHES)
@pytest.mark.parametrize("channel_alpha", [False, True], ids=["scalar", "channel"])
def test_eager_variants_match_float64_reference(squash, channel_alpha):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        _check_variant("eager", squash, channel_alpha, (3, 5, 37), True, dtype)
    _check_variant("eager", squash, channel_alpha, (2, 7, 3, 5), False)  # channels first
    _check_variant("eager", squash, channel_alpha, (9, 13), True, with_bias=False)


@pytest.mark.slow
@pytest.mark.parametrize("squash,channel_alpha", [(s, True) for s in SQUASHES] + [("sigmoid", False)])
def test_compiled_variants_match_float64_reference(squash, channel_alpha):
    """Every squash with a per-channel alpha, and one with a scalar alpha (tanh with a scalar alpha:
    test_dyt_layer.py); each variant is a compiled copy of its own (three compiles), so not all 8."""
    _check_variant("compiled", squash, channel_alpha, (3, 5, 37), True)
    if squash == "hardtanh":  # one channels-first layout (3-D kernels)
        _check_variant("compiled", squash, channel_alpha, (2, 7, 3, 5), False)


def test_fused_backends_refuse_other_variants_and_auto_falls_back():
    tanh_only = [name for name, backend in BACKENDS.items() if not backend.all_options]
    assert "fused" in tanh_only and {"eager", "compiled"}.isdisjoint(tanh_only)
    for name in tanh_only:
        for squash, channel in [("hardtanh", False), ("tanh", True)]:
            shape = "channel" if channel else "scalar"
            with pytest.raises(BackendUnavailableError, match="runs tanh with a scalar alpha only"):
                select_backend(name, "cpu", 10, squash, channel)
            with pytest.raises(ValueError, match="runs tanh with a scalar alpha only"):
                DyT(8, backend=name, squash=squash, alpha_shape=shape)
            with pytest.raises(ValueError, match="runs tanh with a scalar alpha only"):  # a config error at load
                NormConfig(kind="dyt", backend=name, squash=squash, alpha_shape=shape)
    for numel in (10, 2**22):
        assert BACKENDS[auto_backend("cpu", numel, all_options=True)].all_options
    assert select_backend("eager", "cpu", 10, "sigmoid", True).name == "eager"
    if "fused" in dyt.available_backends("cuda"):  # Triton installed: auto would pick fused on CUDA
        assert auto_backend("cuda") == "fused"
        assert auto_backend("cuda", all_options=True) == "compiled"


def test_module_options_fixed_and_channel_alpha():
    fixed = make_norm(NormConfig(kind="dyt", learnable_alpha=False, alpha_init={"default": 0.8}), 6)
    assert "alpha" not in dict(fixed.named_parameters()) and fixed.state_dict()["alpha"].item() == pytest.approx(0.8)
    fixed(torch.randn(4, 6)).sum().backward()
    assert fixed.alpha.grad is None and fixed.weight.grad is not None
    channel = make_norm(NormConfig(kind="dyt", alpha_shape="channel", squash="sigmoid"), 6)
    assert channel.alpha.shape == (6,) and channel.squash == "sigmoid"
    x = torch.randn(4, 6)
    torch.testing.assert_close(channel(x), torch.sigmoid(0.5 * x))  # weight 1, bias 0
    for bad in (dict(squash="relu"), dict(alpha_shape="row"), dict(kind="batchnorm")):
        with pytest.raises(ValueError):
            NormConfig(**bad)
    residual = dyt.ResidualDyT(6, squash="sigmoid", alpha_shape="channel")
    s, y = residual(x, 2 * x)
    torch.testing.assert_close(s, 3 * x)
    torch.testing.assert_close(y, torch.sigmoid(0.5 * s))
    # fold_dyt keeps the squash
    layer, linear = make_norm(NormConfig(kind="dyt", squash="hardtanh"), 6), torch.nn.Linear(6, 3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    folded, (new,) = dyt.fold_dyt(layer, linear)
    torch.testing.assert_close(new(folded(x * 4)), linear(layer(x * 4)))


def test_sigma_reparam_matches_float64_reference():
    torch.manual_seed(0)
    linear = torch.nn.Linear(13, 7)
    w0 = linear.weight.detach().clone()
    x = torch.randn(5, 13)
    before = linear(x).detach()
    dyt.apply_norm_free(linear_holder := torch.nn.Sequential(linear), NormConfig(kind="sigma-reparam"))
    (_, param), = sigma_reparam_layers(linear_holder)
    assert param.gamma.item() == pytest.approx(torch.linalg.matrix_norm(w0, 2).item(), rel=1e-5)
    with torch.no_grad():  # starts as the same function: gamma = sigma(W0), u the top singular vector
        torch.testing.assert_close(linear(x), before, atol=1e-5, rtol=1e-5)
        param.u.copy_(F.normalize(torch.randn(13), dim=0))  # away from the fixed point: one step shows
    u0 = param.u.detach().clone()
    y = linear(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    # float64 reference: one power step from u0, sigma = v^T W u, gradient through W (not u, v)
    w64 = w0.double().requires_grad_()
    gamma64 = param.gamma.detach().double().requires_grad_()
    b64 = linear.bias.detach().double().requires_grad_()
    with torch.no_grad():
        v = F.normalize(w64 @ u0.double(), dim=0)
        u = F.normalize(w64.T @ v, dim=0)
    y64 = F.linear(x.double(), gamma64 * w64 / (v @ w64 @ u), b64)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), atol=1e-5, rtol=1e-5)
    original = linear.parametrizations.weight.original
    assert_grad_close(original.grad, w64.grad, 1e-4, "W")
    assert_grad_close(param.gamma.grad, gamma64.grad, 1e-4, "gamma")
    assert not torch.allclose(u0.double(), u)
    torch.testing.assert_close(param.u.double(), u)  # training mode stores the new u
    linear.eval()
    linear(x)
    torch.testing.assert_close(param.u.double(), u)  # eval mode does not


def test_gates_and_fixup_init():
    assert isinstance(dyt.residual_gate(NormConfig(kind="dyt"), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), torch.nn.Identity)
    gate = SkipInitGate()
    x = torch.randn(3, 4, requires_grad=True)
    out = gate(x)
    assert out.abs().sum() == 0
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(gate.gain.grad, x.detach().sum().reshape(1))
    from dyt_llama.model import Llama, ModelConfig

    def build(kind):
        torch.manual_seed(0)
        return Llama(ModelConfig(dim=24, layers=3, heads=4, kv_heads=2, ffn_dim=40, vocab_size=31, max_seq_len=16,
                                 norm=NormConfig(kind=kind)))

    plain, fixup = build("identity"), build("fixup")
    gates = [m for m in fixup.modules() if isinstance(m, FixupGate)]
    assert len(gates) == 6
    # L ** (-1 / (2m - 2)) with L = 6 branches: attention m = 2 (layers in series), SwiGLU m = 3 (w1 and w3
    # multiply, so each gets L^-1/4 and their product L^-1/2)
    scales = {"attention.wq": 6 ** -0.5, "attention.wk": 6 ** -0.5, "attention.wv": 6 ** -0.5,
              "feed_forward.w1": 6 ** -0.25, "feed_forward.w3": 6 ** -0.25}
    for i in range(3):
        p, f = plain.blocks[i], fixup.blocks[i]
        assert f.attention.wo.weight.abs().sum() == 0 and f.feed_forward.w2.weight.abs().sum() == 0
        for name, scale in scales.items():
            torch.testing.assert_close(f.get_submodule(name).weight, p.get_submodule(name).weight * scale)
        x = torch.randn(5, 24)  # the SwiGLU's gated product shrinks by L^-1/2, as a two-layer branch's inner layer
        gated = {m: F.silu(m.feed_forward.w1(x)) * m.feed_forward.w3(x) for m in (p, f)}
        ratio = gated[f].norm() / gated[p].norm()
        assert 0.8 * 6 ** -0.5 < ratio < 1.25 * 6 ** -0.5, ratio
    torch.testing.assert_close(fixup.output.weight, plain.output.weight)  # outside the branches: untouched


def test_fixup_scales_hyenas_long_filter_not_its_frequencies():
    """HyenaDNA's long filter comes from an MLP of Sin activations: Fixup scales its last layer, so
    the filter is the same shape, smaller; scaling the hidden layers lowered its frequencies."""
    from dyt_dna.config import DnaModelConfig
    from dyt_dna.task import build_model

    def build(kind):
        torch.manual_seed(0)
        return build_model(DnaModelConfig(arch="hyena", dim=16, layers=2, max_len=128, norm=NormConfig(kind=kind)))

    plain, fixup = build("identity"), build("fixup")
    scale = 4 ** -0.5  # L = 4 branches, m = 2
    for p, f in zip(plain.blocks, fixup.blocks, strict=True):
        with torch.no_grad():
            taps = {m: m.mixer.filter(128) for m in (p, f)}
        torch.testing.assert_close(taps[f], taps[p] * scale)
        torch.testing.assert_close(f.mixer.in_proj.weight, p.mixer.in_proj.weight * scale)
        assert f.mixer.out_proj.weight.abs().sum() == 0


@pytest.mark.parametrize("variant,want", [
    ("dyt", ["kind=dyt", "squash=tanh", "learnable_alpha=true", "alpha_shape=scalar"]),
    ("dyt:hardtanh", ["kind=dyt", "squash=hardtanh", "learnable_alpha=true", "alpha_shape=scalar"]),
    ("dyt:sigmoid:fixed-alpha", ["kind=dyt", "squash=sigmoid", "learnable_alpha=false", "alpha_shape=scalar"]),
    ("dyt:channel-alpha", ["kind=dyt", "squash=tanh", "learnable_alpha=true", "alpha_shape=channel"]),
    ("sigma-reparam", ["kind=sigma-reparam"]),
    ("identity", ["kind=identity"]),
])
def test_variant_names(variant, want):
    assert norm_variant_overrides(variant) == [f"model.norm.{w}" for w in want]


@pytest.mark.parametrize("bad", ["dyt:relu", "layernorm:hardtanh", "batchnorm", "dyt:tanh:sigmoid"])
def test_unknown_variant_names_are_user_errors(bad):
    with pytest.raises(UserInputError):
        norm_variant_overrides(bad)


# ------------------------------------------------ every variant and baseline in the four models

VARIANTS = ["native", "dyt", "dyt:hardtanh", "dyt:sigmoid", "dyt:identity", "dyt:fixed-alpha", "dyt:channel-alpha",
            "identity", "skipinit", "fixup", "sigma-reparam"]


def _llama(overrides):
    from dyt_llama.model import Llama
    from dyt_llama.task import LlamaConfig

    cfg = load_config(LlamaConfig, ROOT / "recipes/llama/tiny.yaml", ["model.dim=48", "model.layers=2", "model.heads=4",
                                                                     "model.ffn_dim=64", "model.vocab_size=64", *overrides],
                      check_files=False)
    tokens = torch.randint(0, 64, (4, 17))

    def loss(model):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    return Llama(cfg.model), loss, cfg.model.norm


def _dna(arch, overrides):
    from dyt_dna.caduceus import Caduceus
    from dyt_dna.data import mask_for_mlm
    from dyt_dna.hyena import HyenaDNA
    from dyt_dna.task import DnaConfig

    cfg = load_config(DnaConfig, ROOT / f"recipes/dna/{arch}-tiny.yaml", ["model.dim=32", "model.max_len=64", "data.window=48", *overrides],
                      check_files=False)
    bases = torch.randint(2, 6, (2, 32))

    def loss(model):
        if arch == "hyena":
            inputs, targets = bases[:, :-1], bases[:, 1:]
        else:
            torch.manual_seed(1)
            inputs, targets = mask_for_mlm(bases, 0.15)
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)

    return (HyenaDNA if arch == "hyena" else Caduceus)(cfg.model), loss, cfg.model.norm


def _wav2vec2(overrides):
    from dyt_wav2vec2.model import build_wav2vec2
    from dyt_wav2vec2.task import Wav2Vec2PretrainConfig, masking_min_samples, pretraining_loss

    cfg = load_config(Wav2Vec2PretrainConfig, ROOT / "recipes/wav2vec2/tiny.yaml",
                      ["model.dim=32", "model.ffn_dim=64", "model.distractors=5", "model.pos_conv_kernel=8",
                       "model.conv_layers=[[32, 10, 5], [32, 3, 2]]", *overrides], check_files=False)
    samples = masking_min_samples(cfg.model) + 200
    waves = torch.randn(2, samples, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([samples, samples])

    def loss(model):
        torch.manual_seed(2)  # the same masks and distractors at every step
        return pretraining_loss(model, (waves, lengths), cfg.loss)[0]

    return build_wav2vec2(cfg.model), loss, cfg.model.norm


MODELS = {
    "llama": _llama,
    "wav2vec2": _wav2vec2,
    "hyena": lambda overrides: _dna("hyena", overrides),
    "caduceus": lambda overrides: _dna("caduceus", overrides),
}


def _positions(model):
    """Norm positions that model.norm sets (wav2vec 2.0's conv feature extractor keeps its own)."""
    from dyt_wav2vec2.model import FEATURE_EXTRACTOR

    return [(path, info.kind) for path, _, info in iter_norms(model)
            if isinstance(info, NormInfo) and not path.startswith(FEATURE_EXTRACTOR + ".")]


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
def test_every_variant_builds_lists_its_norms_and_trains(arch):
    torch.manual_seed(0)
    native, _, native_norm = MODELS[arch]([])
    native_positions = _positions(native)
    assert native_positions and {kind for _, kind in native_positions} == {native_norm.kind}
    for variant in VARIANTS:
        overrides = [] if variant == "native" else norm_variant_overrides(variant)
        torch.manual_seed(0)
        model, loss_of, config = MODELS[arch](overrides)
        # every norm position is listed, as DyT or as the removed norm it stands for
        positions = _positions(model)
        assert [p for p, _ in positions] == [p for p, _ in native_positions], variant
        assert {k for _, k in positions} == {config.layer_kind}, variant
        trainable = {n: p.detach().clone() for n, p in model.named_parameters()}
        alphas = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("alpha")}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for step in range(10):
            loss = loss_of(model)
            assert math.isfinite(loss.item()), f"{arch} {variant}: loss {loss.item()} at step {step}"
            if step == 0:
                first = loss.item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), trainable[n])}
        assert changed, f"{arch} {variant}: nothing trained"
        last = loss_of(model).item()  # the same batch (and masks) every step: it must have learned some of it
        assert last < first, f"{arch} {variant}: loss {first:.4f} -> {last:.4f} over 10 steps"
        if variant == "dyt:fixed-alpha":
            assert alphas and all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in alphas.items())
        elif config.kind == "dyt":
            assert any(n.endswith("alpha") for n in changed), f"{arch} {variant}: alpha did not train"
        if variant == "skipinit":
            assert any(n.endswith("gain") for n in changed)
        if variant == "fixup":
            assert any(n.endswith(("scale", "shift")) and "embed" not in n for n in changed)
        if variant == "sigma-reparam":
            assert any(n.endswith("gamma") for n in changed) and sigma_reparam_layers(model)


def test_alpha_tracker_metrics_and_the_papers_plot(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), make_norm(NormConfig(kind="dyt", alpha_shape="channel"), 8),
                                torch.nn.Linear(8, 8), make_norm("dyt", 8))
    tracker = AlphaTracker(model, armed=False)
    x = torch.randn(32, 6)
    model(x)
    assert tracker.inverse_stds() == {}  # not armed: nothing measured
    tracker.armed = True
    model.eval()
    model(x)
    assert tracker.inverse_stds() == {}  # eval forwards are not training activations
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rows = []
    for step in range(1, 4):
        loss = model(x * step).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows.append({"step": step, "train/loss": loss.item(), **tracker.metrics()})
    assert rows[-1]["inv_std/1"] != pytest.approx(rows[0]["inv_std/1"])
    with torch.no_grad():
        first, second = model[0](x), model[2](model[1](model[0](x)))
    model(x)
    assert tracker.inverse_stds() == pytest.approx({"1": 1 / first.std().item(), "3": 1 / second.std().item()}, rel=1e-5)
    assert rows[-1]["alpha/1"] == pytest.approx(model[1].alpha.mean().item())
    history = alpha_scale_history(rows + [{"step": 4, "eval/loss": 1.0}])
    assert [h["step"] for h in history] == [1, 2, 3] and set(history[0]["inv_std"]) == {"1", "3"}
    assert plot_alpha_vs_scale(history, tmp_path / "alpha.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nothing recorded"):
        plot_alpha_vs_scale([], tmp_path / "none.png")


def test_removed_norms_convert_back():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), make_norm("skipinit", 6), torch.nn.Linear(6, 2))
    assert [info.kind for _, _, info in iter_norms(model)] == ["identity"]
    report = dyt.convert_norms(model, "dyt")
    assert len(report.replaced) == 1 and isinstance(model[1], DyT) and model[1].normalized_shape == (6,)


@pytest.mark.parametrize("variant", ["skipinit", "fixup", "sigma-reparam", "dyt:channel-alpha", "dyt:hardtanh"])
def test_caduceus_stays_reverse_complement_equivariant(variant):
    from dyt_dna.tokenizer import COMPLEMENT, reverse_complement

    torch.manual_seed(0)
    model, _, _ = _dna("caduceus", ["model.dim=16", "model.caduceus.state=4", *norm_variant_overrides(variant)])
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # gates away from 0, Fixup's zeroed projections too
    tokens = torch.randint(2, 6, (2, 40))
    # one training-mode forward over a sequence and its reverse complement: sigmaReparam computes
    # each weight once per forward, so both halves see the same sigma
    logits, logits_rc = model(torch.cat([tokens, reverse_complement(tokens)])).chunk(2)
    torch.testing.assert_close(logits_rc, logits.flip(1)[..., COMPLEMENT])


def test_training_logs_alpha_and_input_scale_at_logged_steps(tmp_path):
    import sys

    from dyt.train import read_metrics, run_recipe

    sys.path.insert(0, str(Path(__file__).parent))
    from toy_recipe import ToyConfig, ToyTask

    argv = []
    for item in (f"train.out_dir={tmp_path}", "train.steps=5", "train.log_every=2", "train.eval_every=0",
                 "train.save_every=0", "train.micro_batch_size=16", "train.progress=false"):
        argv += ["--set", item]
    run_recipe(ToyConfig, ToyTask, argv)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 5]
    for row in rows:
        assert row["alpha/1"] > 0 and 0 < row["inv_std/1"] < math.inf
    history = alpha_scale_history(rows)
    assert plot_alpha_vs_scale(history, tmp_path / "alpha.png").stat().st_size > 1000


ALL_ROLES = ("attention", "ffn", "final", "input")


@pytest.mark.parametrize("arch", list(MODELS))
def test_alpha_init_takes_the_roles_a_model_builds_and_refuses_the_others(arch):
    """Each role a model declares sets the alpha0 of some DyT it builds; a role it has no norm of is
    a config error (it would change nothing: a sweep over it trains one model several times)."""
    from dyt.train import ConfigError

    declared = {"llama": "dyt_llama.model", "wav2vec2": "dyt_wav2vec2.model"}
    if arch in declared:
        roles = __import__(declared[arch], fromlist=["NORM_ROLES"]).NORM_ROLES
    else:
        from dyt_dna.config import NORM_ROLES

        roles = NORM_ROLES[arch]
    for role in ALL_ROLES:
        overrides = ["model.norm.kind=dyt", "model.norm.alpha_init={default: 1.0}", f"model.norm.alpha_init.{role}=3.25"]
        if role not in roles:
            with pytest.raises(ConfigError, match=rf"norm\.alpha_init\.{role}: .* has no norm of role"):
                MODELS[arch](overrides)
            continue
        model, _, _ = MODELS[arch](overrides)
        alphas = [m.alpha_init for m in model.modules() if isinstance(m, DyT)]
        assert 3.25 in alphas, (arch, role, alphas)
