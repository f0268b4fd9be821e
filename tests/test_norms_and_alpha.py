"""The norm factory, the alpha0 policy, and the analysis tools."""

import dataclasses

import pytest
import torch
from torch import nn

from dyt import ChannelsFirst, DyT, NormConfig, alpha_init_for, make_norm
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
