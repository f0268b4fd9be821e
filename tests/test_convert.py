"""convert_norms on real model architectures (torchaudio wav2vec2, fairseq2 LLaMA, HF LLaMA) and
on the awkward cases: channels-first norms, shared modules, look-alikes that must be left alone."""

import warnings

import pytest
import torch
from torch import nn

from dyt import ChannelsFirst, DyT, NormConfig, classify_norm, convert_norms, iter_norms


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_torchaudio_wav2vec2_base_all_layernorms_replaced():
    torchaudio = pytest.importorskip("torchaudio")
    model = torchaudio.models.wav2vec2_base()
    layernorms = _count(model, nn.LayerNorm)
    assert layernorms > 20
    with torch.no_grad():  # weights and biases unlike a fresh DyT's ones and zeros, so a copy shows
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    affine = {p: (m.weight.detach().clone(), m.bias.detach().clone())
              for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    report = convert_norms(model, "dyt")
    assert len(report.replaced) == layernorms
    assert _count(model, nn.LayerNorm) == 0
    for path, (weight, bias) in affine.items():
        torch.testing.assert_close(model.get_submodule(path).weight, weight)
        torch.testing.assert_close(model.get_submodule(path).bias, bias)
    left = {a.type.rsplit(".", 1)[-1]: a.reason for a in report.left_alone}
    assert "GroupNorm" in left  # the feature extractor's first GroupNorm is not a per-token norm
    assert all(isinstance(m, DyT) and m.bias is not None for m in model.modules() if isinstance(m, DyT))
    waveform = torch.randn(1, 4000)
    features, _ = model(waveform)
    assert torch.isfinite(features).all()


def test_torchaudio_channels_first_layernorm_round_trip():
    """torchaudio's feature-extractor LayerNorm normalises (batch, channels, time): it becomes a
    channels-first DyT, and converting back reproduces the original outputs exactly."""
    torchaudio = pytest.importorskip("torchaudio")
    torch.manual_seed(0)
    model = torchaudio.models.wav2vec2_model(
        extractor_mode="layer_norm",
        extractor_conv_layer_config=[(16, 10, 5), (16, 3, 2)],
        extractor_conv_bias=True,
        encoder_embed_dim=32,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4,
        encoder_num_layers=2,
        encoder_num_heads=4,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=64,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=True,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    ).eval()
    with torch.no_grad():
        for m in model.modules():  # non-trivial affine parameters, so copying them is tested
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    waveform = torch.randn(2, 800)
    before, _ = model(waveform)
    report = convert_norms(model, "dyt")
    channels_first = [r for r in report.replaced if not r.channels_last]
    assert len(channels_first) == 2 and all("components.LayerNorm" in r.old_type for r in channels_first)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    back = convert_norms(model, "layernorm")
    assert len(back.replaced) == len(report.replaced)
    assert sum(isinstance(m, ChannelsFirst) for m in model.modules()) == 2
    after, _ = model(waveform)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_fairseq2_llama_rmsnorms_become_bias_free_dyt():
    llama = pytest.importorskip("fairseq2.models.llama")
    from fairseq2.nn import BatchLayout

    torch.manual_seed(0)
    config = llama.LLaMAConfig(
        model_dim=64, max_seq_len=32, vocab_size=101, num_layers=2,
        num_attn_heads=4, num_key_value_heads=2, ffn_inner_dim=128,
    )
    model = llama.create_llama_model(config)
    policy = NormConfig(kind="dyt", bias=False, alpha_policy="llm")  # a NormConfig is followed as given
    report = convert_norms(model, policy, role_of=lambda p: "attention" if "self_attn" in p else "ffn")
    assert len(report.replaced) == 2 * 2 + 1
    assert all(r.old_type == "fairseq2.nn.normalization.RMSNorm" for r in report.replaced)
    layers = {p: m for p, m, _ in iter_norms(model)}
    assert all(isinstance(m, DyT) and m.bias is None for m in layers.values())
    assert layers["decoder.layers.0.self_attn_layer_norm"].alpha.item() == 1.0  # width 64 row
    tokens = torch.randint(0, 101, (2, 9))
    logits = model(tokens, BatchLayout(tokens.shape, seq_lens=[9, 9]))
    assert logits.shape == (2, 9, 101) and torch.isfinite(logits).all()


def test_hf_llama_rmsnorm_found_by_probing():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    rms = [p for p, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(rms) == 2 * 2 + 1
    report = convert_norms(model, "dyt")
    assert sorted(r.path for r in report.replaced) == sorted(rms)
    out = model(input_ids=torch.randint(0, 97, (1, 7))).logits
    assert torch.isfinite(out).all()


class OnePlusWeightRMSNorm(nn.Module):
    """Gemma-style RMSNorm scaling by (1 + weight): not a plain RMSNorm, so it must be left alone."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 0.3))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_lookalikes_left_alone_with_reasons():
    model = nn.Sequential(nn.Linear(8, 8), OnePlusWeightRMSNorm(8), nn.BatchNorm1d(8), nn.LayerNorm(8))
    report = convert_norms(model, "dyt")
    assert [r.path for r in report.replaced] == ["3"]
    reasons = {a.path: a.reason for a in report.left_alone}
    assert "matches neither" in reasons["1"]
    assert "batch" in reasons["2"]
    assert "left alone: 2" in str(report)


def test_shared_module_replaced_everywhere_with_one_instance():
    norm = nn.LayerNorm(6)
    model = nn.ModuleDict({"a": norm, "b": nn.Sequential(norm)})
    report = convert_norms(model, "dyt")
    assert len(report.replaced) == 2
    assert model["a"] is model["b"][0] and isinstance(model["a"], DyT)


def test_device_dtype_and_identity_target():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    convert_norms(model, "dyt")
    assert model[1].weight.dtype == torch.bfloat16
    convert_norms(model, "rmsnorm")
    assert isinstance(model[1], nn.RMSNorm) and model[1].weight.dtype == torch.bfloat16
    report = convert_norms(model, "identity")
    assert isinstance(model[1], nn.Identity) and len(report.replaced) == 1


def test_already_target_kind_is_reported_not_replaced():
    model = nn.Sequential(DyT(4))
    report = convert_norms(model, "dyt")
    assert not report.replaced and report.left_alone[0].reason == "already dyt"
    with pytest.raises(ValueError, match="unknown norm kind"):
        convert_norms(model, "batchnorm")
    with pytest.raises(ValueError, match="the model itself is a norm"):
        convert_norms(nn.LayerNorm(3), "dyt")


def test_classify_norm():
    assert classify_norm(nn.Linear(3, 3)) is None
    info = classify_norm(nn.RMSNorm(5))
    assert info.kind == "rmsnorm" and info.shape == (5,) and info.channels_last


def test_a_norm_config_target_is_followed_and_a_bare_kind_keeps_each_bias():
    """Conversion builds through make_norm: a NormConfig's bias and alpha0 reach every new layer (the
    old builder copied the original's bias whatever the config said); a bare kind keeps each bias."""
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8, bias=False))
    convert_norms(model, NormConfig(kind="dyt", bias=False, alpha_init={"default": 0.3}))
    assert [m.bias is None for m in (model[0], model[2])] == [True, True]
    assert model[0].alpha.item() == pytest.approx(0.3)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8, bias=False))
    convert_norms(model, NormConfig(kind="dyt", bias=True))
    assert model[0].bias is not None and model[2].bias is not None and not model[2].bias.any()
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8, bias=False))
    convert_norms(model, "dyt")
    assert model[0].bias is not None and model[2].bias is None
    back = convert_norms(model, NormConfig(kind="layernorm", eps=1e-3))
    assert len(back.replaced) == 2 and model[0].eps == 1e-3 and model[2].eps == 1e-3


class _LayerNorm2d(nn.LayerNorm):
    """timm's / torchvision's image LayerNorm: normalises the channels of (N, C, H, W), 4-D only."""

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError("expected (N, C, H, W)")
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtLayerNorm(nn.Module):
    """The official ConvNeXt's channels-first LayerNorm (the paper converts ConvNeXt)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.rand(channels) - 0.5)
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


@pytest.mark.parametrize("norm", [_LayerNorm2d, _ConvNeXtLayerNorm])
def test_image_models_channels_first_layernorms_found_on_4d_input(norm):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm(8))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    images = torch.randn(2, 3, 6, 6)
    report = convert_norms(model, "dyt")
    assert len(report.replaced) == 1 and not report.replaced[0].channels_last, report
    back = convert_norms(model, "layernorm")
    assert len(back.replaced) == 1
    assert model(images).shape == (2, 8, 4, 4)


def test_a_norm_without_affine_is_rebuilt_where_its_model_is():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False)).to(torch.bfloat16)
    convert_norms(model, "dyt")
    assert isinstance(model[1], DyT) and model[1].alpha.dtype == torch.bfloat16
    assert model(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_model_on_the_meta_device_converts_probed_norms_too():
    class LlamaRMSNorm(nn.Module):  # HF's, found by probing
        def __init__(self, dim, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.variance_epsilon = eps

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), LlamaRMSNorm(16), nn.LayerNorm(16))
    report = convert_norms(model, "dyt")
    assert len(report.replaced) == 2 and not report.left_alone, report
    assert all(isinstance(m, DyT) and m.alpha.device.type == "meta" for m in (model[1], model[2]))
    assert model[1].bias is None and model[2].bias is not None  # the paper's forms: RMSNorm -> DyT without bias


def test_a_residual_dyt_is_left_alone_not_swapped_for_a_one_input_norm():
    from dyt import ResidualDyT

    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("norm", ResidualDyT(4))
    with pytest.warns(UserWarning, match="replaced nothing"):
        report = convert_norms(model, "layernorm")
    assert not report.replaced and "residual add" in report.left_alone[0].reason
    assert isinstance(model.norm, ResidualDyT)


def test_a_bare_kind_keeps_the_epsilon_of_the_norm_it_replaces():
    zero_eps = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, eps=0.0))  # only a norm's eps is kept: DyT has none
    convert_norms(zero_eps, "dyt")
    assert isinstance(zero_eps[1], DyT)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, eps=1e-12))
    convert_norms(model, "rmsnorm")
    assert isinstance(model[1], nn.RMSNorm) and model[1].eps == 1e-12
    convert_norms(model, "layernorm")
    assert model[1].eps == 1e-12


def test_the_llm_alpha_policy_needs_the_layers_roles():
    model = nn.Sequential(nn.Linear(4096, 4096), nn.LayerNorm(4096))
    with pytest.raises(ValueError, match="alpha_policy 'llm' sets alpha0 by each layer's role"):
        convert_norms(model, NormConfig(kind="dyt", alpha_policy="llm"))
    # unless alpha_init sets every role itself
    other = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    convert_norms(other, NormConfig(kind="dyt", alpha_policy="llm", alpha_init={"default": 0.7}))
    assert other[1].alpha.item() == pytest.approx(0.7)
    convert_norms(model, NormConfig(kind="dyt", alpha_policy="llm"), role_of=lambda path: "ffn")
    assert model[1].alpha.item() == pytest.approx(0.2)  # the paper's alpha0 for a 4096-wide LLM's ffn norms


def test_a_new_layer_keeps_the_training_mode_and_frozen_affine_of_the_old():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).eval()
    model[1].weight.requires_grad_(False)
    convert_norms(model, "dyt")
    assert not model[1].training
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad  # as they were
    assert model[1].alpha.requires_grad  # new: nothing to carry over
    model.train()
    convert_norms(model, "layernorm")
    assert model[1].training and not model[1].weight.requires_grad


@pytest.mark.parametrize("norm, to, copy_affine, copied", [
    (nn.LayerNorm(8), "dyt", True, True),
    (nn.LayerNorm(8), "dyt", False, False),
    (nn.LayerNorm(8), NormConfig(kind="dyt", bias=False), True, False),  # the bias is dropped
    (nn.LayerNorm(8, bias=False), NormConfig(kind="dyt", bias=False), True, True),
    (nn.LayerNorm(8), "identity", True, False),
    (nn.LayerNorm(8, elementwise_affine=False), "dyt", True, False),  # nothing to copy
])
def test_affine_copied_says_whether_everything_the_old_layer_had_was_carried(norm, to, copy_affine, copied):
    report = convert_norms(nn.Sequential(nn.Linear(8, 8), norm), to, copy_affine=copy_affine)
    assert report.replaced[0].affine_copied is copied


def test_a_model_whose_norms_are_functions_gets_a_warning():
    class FunctionalNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.layer_norm(self.linear(x), (8,))

    with pytest.warns(UserWarning, match=r"F\.layer_norm or F\.rms_norm, is no module"):
        report = convert_norms(FunctionalNorm(), "dyt")
    assert "replaced 0 (nothing)" in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_norms(nn.Sequential(DyT(8)), "dyt")  # nothing replaced, but its norm is already DyT


def test_torch_transformer_fast_path_fails_after_conversion_until_turned_off():
    """Documented, not handled: in eval mode a batch-first nn.TransformerEncoderLayer reads norm1.eps
    for its fast path, which would run LayerNorm from the norms' weights itself."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    convert_norms(layer, "dyt")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        through_modules = layer(x)  # training mode: never the fast path
        layer.eval()
        with pytest.raises(AttributeError, match="'DyT' object has no attribute 'eps'"):
            layer(x)
        was_enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.testing.assert_close(layer(x), through_modules)
        finally:
            torch.backends.mha.set_fastpath_enabled(was_enabled)


def test_a_conversion_refused_midway_leaves_the_model_as_it_was():
    """convert_norms swapped each layer as it built it, so an error at the second layer (an unknown
    role, a shape DyT cannot take) left the first converted and the model half DyT."""
    model = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="unknown role 'attn'"):
        convert_norms(model, NormConfig(kind="dyt"), role_of=lambda path: "attn" if path == "1" else "default")
    assert [type(m) for m in model] == [nn.LayerNorm, nn.LayerNorm]
    report = convert_norms(model, NormConfig(kind="dyt"))
    assert [type(m) for m in model] == [DyT, DyT] and len(report.replaced) == 2


class _LocalRMSNorm(nn.Module):
    """An HF-style RMSNorm defined in the user's code: found by probing."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class _RunningRMSNorm(_LocalRMSNorm):
    """An RMSNorm that counts its training calls: state the probe must not change."""

    def __init__(self, dim):
        super().__init__(dim)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.steps += 1
        return super().forward(x)


class _ScaleNorm(nn.Module):
    """``g x / ||x||`` with one scalar gain (Nguyen & Salazar 2019): no per-channel weight."""

    def __init__(self, dim):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(1) * dim**0.5), 1e-5

    def forward(self, x):
        return self.weight * x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps)


def test_probing_a_norm_changes_nothing_of_it_and_fires_none_of_its_hooks():
    """The probe ran the module itself: its state changed (a step count, a running statistic) and the
    user's hooks saw the probe's input. It now runs a copy, hooks off."""
    import threading

    class Recorder:  # a hook's owner that cannot be copied (a lock), as a logger or writer holds
        def __init__(self):
            self.lock, self.seen = threading.Lock(), []

        def hook(self, module, args, out):
            self.seen.append(args[0].shape)

    model = nn.Sequential(nn.Linear(8, 8), _RunningRMSNorm(8))
    recorder = Recorder()
    model[1].register_forward_hook(recorder.hook)
    model[1].register_forward_pre_hook(lambda module, args: recorder.seen.append("pre"))
    assert classify_norm(model[1]).kind == "rmsnorm"
    assert int(model[1].steps) == 0 and recorder.seen == []


def test_a_scalar_gain_is_not_taken_for_one_channel():
    """A ScaleNorm's one gain was read as a 1-channel RMSNorm's weight (any normalisation matches on one
    channel): converted, the model then failed at its first forward. It is left alone, with why."""
    model = nn.Sequential(nn.Linear(64, 64), _ScaleNorm(64))
    with pytest.warns(UserWarning, match="convert_norms replaced nothing"):
        report = convert_norms(model, "dyt")
    assert report.replaced == [] and isinstance(model[1], _ScaleNorm)
    assert "its weight is one number, not one per channel" in report.left_alone[0].reason
    assert model(torch.randn(2, 64)).shape == (2, 64)
    one = _LocalRMSNorm(1)
    one.normalized_shape = (1,)  # a real 1-channel norm says so, and is converted
    assert classify_norm(one).shape == (1,)


def test_a_parametrized_norm_is_left_alone_and_said():
    """A norm with a parametrized weight (``torch.nn.utils.parametrize``) was skipped without a word
    when found by probing, and converted, its parametrization dropped, when an nn.LayerNorm."""
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, w):
            return w.abs()

    model = nn.Sequential(_LocalRMSNorm(8), nn.Linear(8, 8), _LocalRMSNorm(8), nn.LayerNorm(8),
                          nn.Linear(8, 8))
    for index in (2, 3, 4):
        parametrize.register_parametrization(model[index], "weight", Positive())
    report = convert_norms(model, "dyt")
    assert [r.path for r in report.replaced] == ["0"]
    reasons = {a.path: a.reason for a in report.left_alone}
    assert set(reasons) == {"2", "3"}  # the parametrized Linear is no norm
    assert all("parametrized (torch.nn.utils.parametrize)" in reason for reason in reasons.values())


def test_converting_a_wrapped_model_is_refused_and_replaced_hooks_are_said():
    """After DistributedDataParallel (or FSDP, or DeepSpeed) has taken a model's parameters, a new
    layer's are not synchronised: each rank's DyT trained alone, silently. Hooks on a replaced layer
    stayed on it, silently too."""

    class DistributedDataParallel(nn.Module):  # the wrapper's name is what is checked: no process group needed
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"the model is a DistributedDataParallel, .* convert the norms first, then wrap"):
        convert_norms(DistributedDataParallel(inner), "dyt")
    with pytest.raises(ValueError, match=r"convert_norms: 1 is a DistributedDataParallel"):
        convert_norms(nn.Sequential(nn.Linear(8, 8), DistributedDataParallel(nn.LayerNorm(8))), "dyt")
    assert isinstance(inner[1], nn.LayerNorm)
    inner[1].register_forward_hook(lambda module, args, out: None)
    with pytest.warns(UserWarning, match=r"convert_norms: 1 had hooks of their own .* register them again"):
        convert_norms(inner, "dyt")
    assert isinstance(inner[1], DyT)
