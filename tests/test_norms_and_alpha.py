"""The norm factory, the alpha0 policy, and the analysis tools."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyt import ChannelsFirst, DyT, NoNorm, NormConfig, alpha_init_for, make_norm
from dyt.analysis import AlphaTracker, NormRecorder, plot_s_curves


@pytest.mark.parametrize(
    "width, attention, other",
    [(512, 1.0, 1.0), (1024, 1.0, 1.0), (2048, 1.0, 0.5), (4096, 0.8, 0.2), (5120, 0.6, 0.15),
     (8192, 0.2, 0.05), (3000, 0.8, 0.2), (16384, 0.2, 0.05)],
)
def test_alpha_policy_table(width, attention, other):
    assert alpha_init_for(width, "attention") == attention
    assert alpha_init_for(width, "ffn") == other
    assert alpha_init_for(width, "final") == other
    assert alpha_init_for(width, "default") == 0.5


def test_alpha_policy_errors():
    with pytest.raises(ValueError, match="unknown DyT role 'mlp'"):
        alpha_init_for(1024, "mlp")
    with pytest.raises(ValueError, match="unknown role"):
        NormConfig(kind="dyt", alpha_init={"mlp": 1.0})


def test_make_norm_kinds():
    assert isinstance(make_norm("layernorm", 8), nn.LayerNorm)
    assert isinstance(make_norm("rmsnorm", 8), nn.RMSNorm)
    assert isinstance(make_norm("identity", 8), nn.Identity)
    layer = make_norm("dyt", 8)
    assert isinstance(layer, DyT) and layer.alpha.item() == 0.5 and layer.bias is not None
    assert make_norm(NormConfig(kind="layernorm", bias=False), 8).bias is None
    for kind in ("layernorm", "rmsnorm"):  # the config's eps reaches the layer, not torch's default
        assert make_norm(NormConfig(kind=kind, eps=0.1), 8).eps == 0.1
    wrapped = make_norm("rmsnorm", 8, channels_last=False)
    assert isinstance(wrapped, ChannelsFirst)
    x = torch.randn(2, 8, 5)
    torch.testing.assert_close(wrapped(x), nn.functional.rms_norm(x.movedim(1, -1), (8,), eps=1e-5).movedim(-1, 1))
    with pytest.raises(ValueError, match="unknown norm kind 'groupnorm'"):
        make_norm("groupnorm", 8)


def test_make_norm_llm_alpha_by_role_and_overrides():
    config = NormConfig(kind="dyt", bias=False, alpha_policy="llm", alpha_init={"final": 0.3})
    assert make_norm(config, 4096, role="attention").alpha.item() == pytest.approx(0.8)
    assert make_norm(config, 4096, role="ffn").alpha.item() == pytest.approx(0.2)
    assert make_norm(config, 4096, role="final").alpha.item() == pytest.approx(0.3)
    assert make_norm(config, 4096).bias is None
    everywhere = NormConfig(kind="dyt", alpha_init={"default": 0.9}, alpha_policy="llm")
    assert make_norm(everywhere, 4096, role="attention").alpha.item() == pytest.approx(0.9)


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 16), DyT(16), nn.Linear(16, 2))


def test_norm_recorder_and_s_curve_plot(tmp_path):
    model = _small_model()
    with NormRecorder(model, max_points=50) as recorder:
        model(torch.randn(20, 6))
    assert set(recorder.records) == {"1", "4"}
    x, y = recorder.records["4"]
    assert x.shape == y.shape == (50,)
    torch.testing.assert_close(y, torch.tanh(0.5 * x))  # fresh DyT: weight 1, bias 0
    assert not model[1]._forward_hooks  # hooks removed on exit
    png = plot_s_curves(recorder.records, tmp_path / "s.png", title="test")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no norm layers"):
        plot_s_curves({}, tmp_path / "empty.png")


def _with_affine(norm: nn.Module) -> nn.Module:
    """``norm`` with a per-channel weight away from 1 and bias away from 0."""
    with torch.no_grad():
        for name, p in norm.named_parameters():
            if name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return norm


@pytest.mark.parametrize("norm, channels_last, before_affine", [
    (nn.LayerNorm(16, eps=1e-3), True, lambda x: F.layer_norm(x, (16,), eps=1e-3)),
    (nn.RMSNorm(16, eps=1e-6), True, lambda x: F.rms_norm(x, (16,), eps=1e-6)),
    (DyT(16, alpha_init=0.7, squash="hardtanh"), True, lambda x: F.hardtanh(0.7 * x)),
    (DyT(16, alpha_init=0.7, channels_last=False), False, lambda x: torch.tanh(0.7 * x)),
    (make_norm("layernorm", 16, channels_last=False), False, lambda x: F.layer_norm(x, (16,))),
    (NoNorm(16), True, lambda x: x),
], ids=["layernorm", "rmsnorm", "dyt-hardtanh", "dyt-channels-first", "channels-first-layernorm", "identity"])
def test_norm_recorder_records_the_output_before_the_affine(norm, channels_last, before_affine):
    """The paper's Fig. 2 plots each norm's output before its per-channel weight and bias."""
    torch.manual_seed(0)
    model = nn.Sequential(_with_affine(norm))
    x = torch.randn(3, 5, 16) * 3 if channels_last else torch.randn(3, 16, 5) * 3
    with NormRecorder(model, max_points=x.numel()) as recorder:
        model(x)
    recorded_x, recorded_y = recorder.records["0"]
    x_last = x if channels_last else x.movedim(1, -1)
    torch.testing.assert_close(recorded_x, x_last.reshape(-1))
    torch.testing.assert_close(recorded_y, before_affine(x_last).reshape(-1))


def test_norm_recorder_pools_every_call_uniformly():
    """A layer called on several batches is sampled from all of them, in proportion to their sizes;
    while everything fits, everything is kept."""
    model = nn.Sequential(DyT(10))
    with NormRecorder(model, max_points=100) as recorder:
        model(torch.full((3, 10), -1.0))
        model(torch.full((5, 10), 2.0))
    assert sorted(recorder.records["0"][0].tolist()) == [-1.0] * 30 + [2.0] * 50
    with NormRecorder(model, max_points=2000) as recorder:
        for value, rows in ((-1.0, 100), (2.0, 300), (5.0, 400)):  # 1000, 3000 and 4000 elements
            model(torch.full((rows, 10), value))
    x, y = recorder.records["0"]
    assert x.shape == y.shape == (2000,)
    shares = [(x == value).float().mean().item() for value in (-1.0, 2.0, 5.0)]
    assert shares == pytest.approx([1 / 8, 3 / 8, 4 / 8], abs=0.04)
    torch.testing.assert_close(y, torch.tanh(0.5 * x))


def test_norm_recorder_takes_a_keyword_input_and_hooks_a_shared_norm_once():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.again = self.norm  # one module under two names

        def forward(self, x):
            return self.again(input=self.norm(input=x))

    block = Block()
    x = torch.randn(4, 8)
    with NormRecorder(block, max_points=1000) as recorder:
        assert len(block.norm._forward_hooks) == 1
        block(x)
    assert set(recorder.records) == {"norm"}
    once = F.layer_norm(x, (8,))
    torch.testing.assert_close(recorder.records["norm"][0], torch.cat([x, once]).reshape(-1))


def test_alpha_tracker_records_alpha_and_inverse_std(tmp_path):
    model = _small_model()
    tracker = AlphaTracker(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(32, 6)
        with torch.no_grad():
            expected = 1 / model[3](model[2](model[1](model[0](x)))).std().item()
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        row = tracker.record(step)
        assert row["inv_std"]["4"] == pytest.approx(expected, rel=1e-5)
    assert [r["step"] for r in tracker.history] == [0, 1, 2]
    assert tracker.history[0]["alpha"]["4"] != tracker.history[-1]["alpha"]["4"]
    tracker.save(tmp_path / "alpha.jsonl")
    assert len((tmp_path / "alpha.jsonl").read_text().splitlines()) == 3
    assert tracker.plot(tmp_path / "alpha.png").stat().st_size > 1000
    tracker.close()
    assert not model[4]._forward_pre_hooks


def test_alpha_tracker_measures_what_a_residual_dyt_squashes():
    """A ResidualDyT squashes s = x + residual: 1/std is that sum's, not x's alone."""
    from dyt import ResidualDyT

    layer = ResidualDyT(6)
    tracker = AlphaTracker(layer)
    x, residual = torch.randn(32, 6) * 0.01, torch.randn(32, 6) * 10
    expected = 1 / (x + residual).std().item()
    for step, call in enumerate((lambda: layer(x, residual), lambda: layer(x, residual=residual),
                                 lambda: layer(residual=residual, x=x))):
        call()
        assert tracker.record(step)["inv_std"][""] == pytest.approx(expected, rel=1e-5)
    tracker.close()


def test_s_curves_thinned_to_any_number_of_panels(tmp_path):
    records = {str(i): (torch.randn(10), torch.randn(10)) for i in range(5)}
    assert plot_s_curves(records, tmp_path / "one.png", max_panels=1).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="max_panels must be at least 1"):
        plot_s_curves(records, tmp_path / "none.png", max_panels=0)



@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "dyt", "identity", "skipinit", "fixup", "sigma-reparam"])
def test_a_norm_kind_reads_the_fields_it_says_it_reads(kind):
    """``NormConfig.reads`` (which a comparison uses to refuse sweeping a setting some norm ignores)
    agrees with make_norm: changing a field changes the layer built exactly where the kind reads it."""
    from dyt import NormConfig, make_norm

    values = {"eps": (1e-5, 1e-3), "affine": (True, False), "bias": (True, False), "alpha_policy": ("default", "llm"),
              "alpha_init": ({}, {"default": 2.0}), "backend": (None, "eager"), "squash": ("tanh", "hardtanh"),
              "learnable_alpha": (True, False), "alpha_shape": ("scalar", "channel")}
    assert set(values) | {"kind"} == {f.name for f in dataclasses.fields(NormConfig)}

    def built(**setting):
        layer = make_norm(NormConfig(kind=kind, **setting), 64, role="ffn")
        return (repr(layer), {k: v.tolist() for k, v in layer.state_dict().items()},
                [(name, p.requires_grad) for name, p in layer.named_parameters()])

    for name, (first, second) in values.items():
        changes = built(**{name: first}) != built(**{name: second})
        assert changes == NormConfig(kind=kind).reads(name), (kind, name, changes)


def test_make_norm_takes_any_integer_count_and_one_channel_count_channels_first():
    """A numpy or 0-d tensor channel count built a DyT only by accident of a later index (numpy's
    int64 failed there); a channels-first layer over two dims was built for LayerNorm and refused
    for DyT, so a model built with it could never be converted."""
    import numpy as np

    for count in (np.int64(8), torch.tensor(8), 8):
        for kind in ("dyt", "layernorm", "rmsnorm"):
            layer = make_norm(kind, count)
            assert layer(torch.randn(2, 8)).shape == (2, 8), (kind, count)
    llm = NormConfig(kind="dyt", alpha_policy="llm")  # alpha0 by the width: the count is read, not assumed
    wide = make_norm(llm, np.int64(8192), role="attention").alpha.item()
    assert wide == make_norm(llm, 8192, role="attention").alpha.item() != make_norm(llm, 256, role="attention").alpha.item()
    for kind in ("dyt", "layernorm", "rmsnorm", "identity"):
        with pytest.raises(ValueError, match="a channels-first norm layer takes one channel count, not \\(4, 8\\)"):
            make_norm(kind, (4, 8), channels_last=False)
    assert isinstance(make_norm("layernorm", (4, 8)), nn.LayerNorm)  # channels-last: a trailing shape, as nn.LayerNorm


def test_backend_names_read_as_the_environment_variable_is_and_say_where_they_came_from(monkeypatch):
    from dyt.backends import default_backend

    assert DyT(4, backend=" CPU ").backend == "cpu" and NormConfig(kind="dyt", backend="Eager").backend == "eager"
    with pytest.raises(ValueError, match="runs tanh with a scalar alpha only"):  # checked under either spelling
        NormConfig(kind="dyt", backend="Fused", squash="hardtanh")
    monkeypatch.setenv("DYT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown DyT backend 'bogus' \\(in DYT_BACKEND\\); choose one of auto"):
        default_backend()
    with pytest.raises(ValueError, match="unknown DyT backend 'bogus' \\(in DYT_BACKEND\\)"):
        DyT(4)  # where the model is built, not at its first forward
    assert DyT(4, backend="eager").backend == "eager"  # a layer that names its backend does not read it
    with pytest.raises(ValueError, match="unknown DyT backend 'fast'; choose one of"):
        DyT(4, backend="fast")


def test_channels_first_dyt_takes_an_empty_batch():
    for backend in ("eager", "auto"):
        layer = DyT(8, channels_last=False, backend=backend)
        assert layer(torch.randn(0, 8, 4, 4)).shape == (0, 8, 4, 4)
        assert layer(torch.randn(2, 8, 0)).shape == (2, 8, 0)
