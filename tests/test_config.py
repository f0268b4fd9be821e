"""Recipe configs: YAML, dotted overrides, shorthand, errors that name the key."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dyt import NormConfig
from dyt.train import ConfigError, TrainConfig, dump_yaml, load_config, parse_args

sys.path.insert(0, str(Path(__file__).parent))
from toy_recipe import ToyConfig  # noqa: E402


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  width: 32\n  norm: rmsnorm\ntrain:\n  steps: 7\n  betas: [0.8, 0.9]\n")
    config = load_config(ToyConfig, path, ["model.norm=dyt", "train.lr=1e-3", "model.norm.alpha_init.attention=0.8"])
    assert config.model.width == 32
    assert config.model.norm == NormConfig(kind="dyt", alpha_init={"attention": 0.8})
    assert config.train.steps == 7 and config.train.lr == 1e-3 and config.train.betas == (0.8, 0.9)
    assert config.data.examples == 256  # untouched default


def test_shorthand_keeps_other_norm_settings():
    config = load_config(ToyConfig, None, ["model.norm.eps=1e-6", "model.norm=layernorm"])
    assert config.model.norm.kind == "layernorm" and config.model.norm.eps == 1e-6


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.nrom=dyt", "unknown key 'model.nrom'; valid keys under 'model': width, dropout, norm"),
        ("trian.steps=3", "unknown key 'trian.steps'; valid keys: model, data, train"),
        ("train.steps=many", "train.steps: expected an integer, got 'many'"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        ("model.norm=batchnorm", "unknown norm kind 'batchnorm'"),
        ("model.width.x=1", "'model.width' has no sub-keys"),
        ("train.steps", "not of the form key=value"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(ToyConfig, None, [override])
    assert message in str(error.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ToyConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'; valid keys under 'train': out_dir, steps"):
        load_config(ToyConfig, bad)


def test_print_config_round_trips(tmp_path, capsys):
    config, args = parse_args(ToyConfig, ["--set", "model.norm=rmsnorm", "--print-config"])
    assert args.print_config
    text = dump_yaml(config)
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(ToyConfig, path) == config


def test_cli_config_error_exits_with_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(ToyConfig, ["--set", "model.nrom=dyt"], prog="toy")
    assert exit_info.value.code == 2
    assert "config error: unknown key 'model.nrom'" in capsys.readouterr().err


def test_optional_nested_dataclass():
    @dataclass
    class Outer:
        norm: NormConfig | None = None
        train: TrainConfig = field(default_factory=TrainConfig)

    assert load_config(Outer, None, ["norm=dyt"]).norm.kind == "dyt"
    assert load_config(Outer, None, []).norm is None
