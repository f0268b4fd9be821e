"""Recipe configs: YAML, dotted overrides, shorthand, errors that name the key."""

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dyt import NormConfig
from dyt.train import ConfigError, TrainConfig, load_config, parse_args
from dyt.train.config import unknown_keys

sys.path.insert(0, str(Path(__file__).parent))
from toy_recipe import ToyConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  width: 32\n  norm: rmsnorm\ntrain:\n  steps: 7\n  betas: [0.8, 0.9]\n")
    config = load_config(ToyConfig, path, ["model.norm=dyt", "train.lr=1e-3", "model.norm.alpha_init.attention=0.8"])
    assert config.model.width == 32
    assert config.model.norm == NormConfig(kind="dyt", alpha_init={"attention": 0.8})
    assert config.train.steps == 7 and config.train.lr == 1e-3 and config.train.betas == (0.8, 0.9)
    assert config.data.examples == 256  # untouched default


def test_a_section_given_as_a_mapping_keeps_the_files_other_keys(tmp_path):
    """Defaults, then the file, then the overrides, also where an override gives a whole section:
    `--set train={lr: 1e-3}` sets lr over the file's train section (it replaced the section, and the
    file's steps and betas went back to the defaults); a mapping-valued setting is replaced whole."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  norm: {kind: dyt, alpha_init: {attention: 8, ffn: 4}}\ntrain:\n  steps: 7\n"
                    "  betas: [0.8, 0.9]\n")
    config = load_config(ToyConfig, path, ["train={lr: 1e-3}", "model.norm={eps: 1e-6}"])
    assert config.train.lr == 1e-3 and config.train.steps == 7 and config.train.betas == (0.8, 0.9)
    assert config.model.norm == NormConfig(kind="dyt", eps=1e-6, alpha_init={"attention": 8, "ffn": 4})
    config = load_config(ToyConfig, path, ["model.norm={alpha_init: {ffn: 1}}"])
    assert config.model.norm.alpha_init == {"ffn": 1}
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        load_config(ToyConfig, path, ["train={lrr: 1e-3}"])


def test_shorthand_keeps_other_norm_settings():
    config = load_config(ToyConfig, None, ["model.norm.eps=1e-6", "model.norm=layernorm"])
    assert config.model.norm.kind == "layernorm" and config.model.norm.eps == 1e-6


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.nrom=dyt", "unknown key 'model.nrom'; valid keys under 'model': width, dropout, bias, norm"),
        ("trian.steps=3", "unknown key 'trian.steps'; valid keys: model, data, train"),
        ("train.steps=many", "train.steps: expected an integer, got 'many'"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        ("model.norm=batchnorm", "unknown norm kind 'batchnorm'"),
        ("model.width.x=1", "'model.width' has no sub-keys"),
        ("train.steps", "not of the form key=value"),
        ("train.steps=-5", "train.steps: -5 is out of range: it must be at least 1"),
        ("train.lr=0", "train.lr: 0.0 is out of range: it must be greater than 0"),
        ("train.betas=[0.9, 1.5]", "train.betas[1]: 1.5 is out of range: it must be at least 0 and less than 1"),
        ("train.zero_stage=4", "train.zero_stage: 4 is out of range: it must be from 0 to 3"),
        ("train.lr=[1", "override 'train.lr=[1': the value is not valid YAML"),
        ("train.lr=.inf", "train.lr: inf is not a finite number: it must be greater than 0"),
        ("train.grad_clip=.nan", "train.grad_clip: nan is not a finite number: it must be at least 0"),
        ("train.seed=4294967296", "train.seed: 4294967296 is out of range: it must be from 0 to 4294967295"),
        ("train.out_dir=", "train.out_dir is empty"),
        ("model.norm.backend=bogus", "unknown DyT backend 'bogus'"),
        ("model.norm.eps=0", "eps must be a positive number"),
        ("model.norm.alpha_init.ffn=-3", "alpha_init.ffn must be a positive number"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(ToyConfig, None, [override])
    assert message in str(error.value)


@pytest.mark.parametrize("value, expected", [
    ("0755", "0755"),  # YAML 1.1: the octal 493
    ("1.10", "1.10"),  # a float, 1.1
    ("yes", "yes"),  # true
    ("runs/a #2", "runs/a #2"),  # ' #2' a comment
    ("'quoted'", "quoted"),  # quotes are YAML's
])
def test_a_string_setting_keeps_the_override_text(value, expected):
    config = load_config(ToyConfig, None, [f"train.out_dir={value}", "train.steps=12", "train.lr=1e-3"])
    assert config.train.out_dir == expected
    assert config.train.steps == 12 and config.train.lr == 1e-3  # other types: as YAML reads them


def test_null_clears_an_optional_string_setting():
    config = load_config(ToyConfig, None, ["train.deepspeed_config=recipes/x.json", "train.deepspeed_config=null"])
    assert config.train.deepspeed_config is None


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ToyConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=f"{tmp_path} is a folder: give a config file"):
        load_config(ToyConfig, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'; valid keys under 'train': out_dir, steps") as error:
        load_config(ToyConfig, bad)
    assert str(error.value).startswith(f"{bad}: ")  # which file: e.g. an eval pointed at another recipe's run


@pytest.mark.parametrize("recipe, command, first", [
    ("llama/tiny.yaml", "dyt_wav2vec2.task:Wav2Vec2PretrainConfig", "model.kv_heads"),
    ("wav2vec2/tiny.yaml", "dyt_dna.task:DnaConfig", "model.heads"),
    ("dna/hyena-tiny.yaml", "dyt_llama.task:LlamaConfig", "model.arch"),
])
def test_another_recipes_config_is_named_as_perhaps_that(recipe, command, first):
    """A shipped config given to another recipe's command was refused for its first unknown key, with
    that section's valid keys: as if one setting were mistyped. Several unknown keys say what it is."""
    import importlib

    module, name = command.split(":")
    cls = getattr(importlib.import_module(module), name)
    path = Path(__file__).parents[1] / "recipes" / recipe
    with pytest.raises(ConfigError) as error:
        load_config(cls, path)
    assert str(error.value).startswith(f"{path}: ")
    assert re.search(rf"\d+ keys this recipe does not have \({re.escape(first)}, .*\): another recipe's config\? "
                     rf"This command reads a {name} \(sections model, data, ", str(error.value)), str(error.value)


def test_one_or_two_unknown_keys_are_named_with_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n  lrr: 0.1\nmodel: {widht: 4}\n")
    assert unknown_keys(ToyConfig, yaml.safe_load(bad.read_text())) == ["train.stpes", "train.lrr", "model.widht"]
    with pytest.raises(ConfigError, match="3 keys this recipe does not have .train.stpes, train.lrr, model.widht.: "):
        load_config(ToyConfig, bad)
    bad.write_text("train:\n  stpes: 3\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'; valid keys under 'train': "):
        load_config(ToyConfig, bad)


def test_yaml_and_deepspeed_json_errors_name_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:1: invalid YAML: while parsing a flow sequence"):
        load_config(ToyConfig, bad)
    bad.write_text("train:\n  steps: 3\nmodel:\n  width: 8\ntrain:\n  lr: 0.1\n")  # plain YAML keeps the last train:
    with pytest.raises(ConfigError, match=r"bad.yaml:5:1: invalid YAML: the key 'train' appears twice in one mapping"):
        load_config(ToyConfig, bad)
    merged = tmp_path / "merged.yaml"  # YAML merge keys still load, a merged key overridden
    merged.write_text("base: &base {steps: 3, lr: 0.1}\ntrain:\n  <<: *base\n  lr: 0.2\n")
    from dyt.train.config import _read_yaml

    assert _read_yaml(merged)["train"] == {"steps": 3, "lr": 0.2}
    bad.write_text("train:\n  steps: 3\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:3: invalid YAML: the key 'steps' appears twice"):
        load_config(ToyConfig, bad)
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2},, }')
    with pytest.raises(ConfigError, match=r"ds.json:1:36: invalid JSON in train.deepspeed_config"):
        load_config(ToyConfig, None, [f"train.deepspeed_config={ds}"])
    ds.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"ds.json \(train.deepspeed_config\): expected a JSON object"):
        load_config(ToyConfig, None, [f"train.deepspeed_config={ds}"])
    ds.write_text('{"gradient_accumulation_steps": 4}')
    with pytest.raises(ConfigError, match="sets 'gradient_accumulation_steps', which the harness derives: remove it "
                                          "and set train.grad_accum"):
        load_config(ToyConfig, None, [f"train.deepspeed_config={ds}"])
    with pytest.raises(ConfigError, match="train.deepspeed_config: no such file"):
        load_config(ToyConfig, None, [f"train.deepspeed_config={tmp_path / 'none.json'}"])
    # an eval reading a finished run's config.yaml does not need the JSON
    config = load_config(ToyConfig, None, [f"train.deepspeed_config={tmp_path / 'none.json'}"], check_files=False)
    assert config.train.deepspeed_config == str(tmp_path / "none.json")


def test_cross_field_checks_run_when_the_config_loads():
    from dyt_dna.task import DnaConfig
    from dyt_llama.task import LlamaConfig

    with pytest.raises(ConfigError, match=r"data.seq_len=512 exceeds the model's context \(model.max_seq_len=256\)"):
        load_config(LlamaConfig, None, ["data.seq_len=512"])
    with pytest.raises(ConfigError, match=r"data.window=2048 is longer than the model's context \(model.max_len=1024\)"):
        load_config(DnaConfig, None, ["data.window=2048"])
    with pytest.raises(ConfigError, match="data.max_n_fraction: 1.5 is out of range: it must be from 0 to 1"):
        load_config(DnaConfig, None, ["data.max_n_fraction=1.5"])


def test_print_config_round_trips(tmp_path, capsys):
    """``--print-config`` prints the resolved config, which loads back to the same config, and
    trains nothing (no task built, no run folder)."""
    from dyt.train.cli import run_recipe

    out = tmp_path / "run"
    argv = ["--set", "model.norm=rmsnorm", "--set", f"train.out_dir={out}", "--print-config"]

    def no_task(config):
        raise AssertionError("--print-config built the task")

    assert run_recipe(ToyConfig, no_task, argv) is None
    path = tmp_path / "resolved.yaml"
    path.write_text(capsys.readouterr().out)
    config, _ = parse_args(ToyConfig, argv[:-1])
    assert load_config(ToyConfig, path) == config and config.model.norm.kind == "rmsnorm"
    assert not out.exists()
    # a global batch: the grad_accum printed is not the one a launch trains with, and the output says so
    argv = ["--set", "train.global_batch_size=32", "--set", "train.micro_batch_size=4", "--print-config"]
    assert run_recipe(ToyConfig, no_task, argv) is None
    printed = capsys.readouterr().out
    assert printed.endswith("# train.grad_accum is derived by each launch from train.global_batch_size: 32 / (4 x ranks)\n")
    path.write_text(printed)
    assert load_config(ToyConfig, path) == parse_args(ToyConfig, argv[:-1])[0]


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


@pytest.mark.parametrize(
    "file_norm, override, want",
    [
        ("dyt", "model.norm.alpha_init.attention=0.6", {"kind": "dyt", "alpha_init": {"attention": 0.6}}),
        ("rmsnorm", "model.norm.eps=1e-6", {"kind": "rmsnorm", "eps": 1e-6}),
        ("{kind: dyt}", "model.norm.bias=false", {"kind": "dyt", "bias": False}),
    ],
)
def test_dotted_norm_key_keeps_a_scalar_norm_kind(tmp_path, file_norm, override, want):
    """Bug: a scalar ``norm: dyt`` in the file followed by a dotted norm key was replaced by {},
    so the model silently became LayerNorm (NormConfig's class default)."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  norm: {file_norm}\n")
    norm = load_config(ToyConfig, path, [override]).model.norm
    for key, value in want.items():
        assert getattr(norm, key) == value, (key, getattr(norm, key))


def test_partial_sections_keep_the_recipes_own_defaults(tmp_path):
    """Bug: ``--set model.norm=dyt`` (or a file setting only some norm keys) rebuilt the norm from
    NormConfig's class defaults (bias on, alpha policy default), not the recipe's field default."""

    @dataclass
    class Model:
        norm: NormConfig = field(default_factory=lambda: NormConfig(kind="rmsnorm", bias=False, alpha_policy="llm"))

    @dataclass
    class Recipe:
        model: Model = field(default_factory=Model)

    for overrides in (["model.norm=dyt"], ["model.norm.kind=dyt"], ["model.norm.alpha_init.ffn=0.3", "model.norm=dyt"]):
        norm = load_config(Recipe, None, overrides).model.norm
        assert (norm.kind, norm.bias, norm.alpha_policy) == ("dyt", False, "llm"), overrides
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  norm: dyt\n")
    assert load_config(Recipe, path).model.norm == NormConfig(kind="dyt", bias=False, alpha_policy="llm")
    path.write_text("model:\n  norm: {kind: layernorm, bias: true}\n")
    assert load_config(Recipe, path).model.norm == NormConfig(kind="layernorm", bias=True, alpha_policy="llm")


def test_llama_dyt_from_the_command_line_alone_is_the_papers_llama_dyt():
    """docs/llama.md: ``--set model.norm=dyt`` gives bias-free DyT with the paper's alpha0 table."""
    from dyt_llama.task import LlamaConfig

    norm = load_config(LlamaConfig, None, ["model.norm=dyt", "model.dim=4096"]).model.norm
    assert norm.kind == "dyt" and norm.bias is False and norm.alpha_policy == "llm"
    assert (norm.alpha_for(4096, "attention"), norm.alpha_for(4096, "ffn")) == (0.8, 0.2)


# ---------------------------------------------------------------- one source of truth: train.* over a DeepSpeed JSON

@pytest.mark.parametrize(
    "json_text, settings, names",
    [
        ('{"bf16": {"enabled": true}}', [], ("bf16.enabled=true", "train.precision='fp32'", "bf16.enabled=false")),
        ('{"bf16": {"enabled": false}}', ["train.precision=bf16"], ("bf16.enabled=false", "train.precision='bf16'")),
        ('{"fp16": {"enabled": true}}', ["train.precision=bf16"], ("fp16.enabled=true", "train.precision='bf16'")),
        ('{"zero_optimization": {"stage": 3}}', ["train.zero_stage=2"],
         ("zero_optimization.stage=3", "train.zero_stage=2", "zero_optimization.stage=2")),
        ('{"gradient_clipping": 0.5}', [], ("gradient_clipping=0.5", "train.grad_clip=1.0")),
        ('{"bf16": {"enabled": "auto"}}', ["train.precision=bf16"], ('bf16.enabled="auto"', "train.precision='bf16'")),
    ],
)
def test_a_deepspeed_json_that_contradicts_train_settings_is_an_error_naming_both(tmp_path, json_text, settings, names):
    ds = tmp_path / "ds.json"
    ds.write_text(json_text)
    with pytest.raises(ConfigError) as error:
        load_config(ToyConfig, None, [f"train.deepspeed_config={ds}", *settings])
    message = str(error.value)
    assert "ds.json (train.deepspeed_config) sets" in message and "one source of truth" in message
    for name in names:
        assert name in message, (name, message)


@pytest.mark.parametrize(
    "json_text, key",
    [
        ('{"bfloat16": {"enabled": true}}', "bfloat16"),
        ('{"amp": {"enabled": true}}', "amp"),
        ('{"torch_autocast": {"enabled": true}}', "torch_autocast"),
        ('{"data_types": {"param_dtype": "bf16"}}', "data_types.param_dtype"),
        ('{"checkpoint": {"load_universal": true}}', "checkpoint.load_universal"),
        ('{"optimizer": {"type": "Adam"}}', "optimizer"),
        ('{"managed_gradient_accumulation": false}', "managed_gradient_accumulation"),
        ('{"zero_optimization": {"load_from_fp32_weights": false}}', "zero_optimization.load_from_fp32_weights"),
    ],
)
def test_a_deepspeed_json_may_not_set_what_the_harness_derives(tmp_path, json_text, key):
    ds = tmp_path / "ds.json"
    ds.write_text(json_text)
    with pytest.raises(ConfigError, match=f"sets '{key}', which the harness derives: remove it and "):
        load_config(ToyConfig, None, [f"train.deepspeed_config={ds}"])


@pytest.mark.parametrize("section", ["zero_optimization", "bf16", "fp16"])
def test_a_deepspeed_json_section_must_be_an_object(tmp_path, section):
    """DeepSpeed takes ``"zero_optimization": true`` as ZeRO-1 (the merge replaced the harness's
    stage with the boolean), whatever train.zero_stage said."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({section: True}))
    with pytest.raises(ConfigError, match=f"sets '{section}' to true, not an object"):
        load_config(ToyConfig, None, [f"train.deepspeed_config={ds}", "train.zero_stage=3"])


def test_a_deepspeed_json_may_restate_train_settings_and_add_its_own(tmp_path):
    from dyt.train import deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True, "immediate_grad_update": True}, "fp16": {"enabled": False},
                              "zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 1}))
    config = load_config(ToyConfig, None, [f"train.deepspeed_config={ds}", "train.precision=bf16", "train.zero_stage=2"])
    merged = deepspeed_config(config.train)
    assert merged["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert merged["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False, "overlap_comm": True}
    assert merged["gradient_clipping"] == 1


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_shipped_deepspeed_jsons_run_what_the_config_says(stage):
    """Each ``recipes/llama/ds_zeroN.json`` states its ZeRO stage (so it needs train.zero_stage=N) and
    no precision: the engine's settings are those of ``train.*`` (which config.yaml records)."""
    from dyt.train import deepspeed_config
    from dyt_llama.task import LlamaConfig

    path = ROOT / f"recipes/llama/ds_zero{stage}.json"
    for precision in ("fp32", "bf16"):
        config = load_config(LlamaConfig, ROOT / "recipes/llama/tiny.yaml",
                             [f"train.deepspeed_config={path}", f"train.zero_stage={stage}", f"train.precision={precision}"])
        merged, derived = deepspeed_config(config.train), config.train.derived_deepspeed_config()
        for key in ("bf16", "fp16", "gradient_clipping", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert merged[key] == derived[key], (path.name, key)
        assert merged["zero_optimization"]["stage"] == stage
    with pytest.raises(ConfigError, match=f"zero_optimization.stage={stage} but train.zero_stage={(stage + 1) % 4}"):
        load_config(LlamaConfig, ROOT / "recipes/llama/tiny.yaml",
                    [f"train.deepspeed_config={path}", f"train.zero_stage={(stage + 1) % 4}"])


def test_a_schedule_ending_above_its_peak_is_refused():
    with pytest.raises(ConfigError, match=r"train.min_lr=3e-05 is above train.lr=1e-05"):
        TrainConfig(lr=1e-5)  # the default min_lr 3e-5
    assert TrainConfig(lr=1e-5, min_lr=1e-6).min_lr == 1e-6


@pytest.mark.parametrize("size", ["125m", "1b", "7b", "13b", "34b", "70b"])
def test_the_llama_paper_configs_decay_to_a_tenth_of_their_peak(size):
    import yaml

    train = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "llama" / f"{size}.yaml").read_text())["train"]
    assert train["min_lr"] == pytest.approx(train["lr"] / 10)


@pytest.mark.parametrize("size", ["7b", "13b", "34b", "70b"])
def test_the_llama_paper_configs_train_on_4m_token_batches_whatever_the_rank_count(size):
    """LLaMA 2's global batch, 4M tokens, on any power-of-two GPU count from 1 to 256 (grad_accum derived)."""
    config = load_config(__import__("dyt_llama.task", fromlist=["LlamaConfig"]).LlamaConfig,
                         Path(__file__).parents[1] / "recipes" / "llama" / f"{size}.yaml", [])
    assert config.train.global_batch_size * config.data.seq_len == 4 * 2**20
    for ranks in (1, 8, 64, 256):
        train = config.train.for_world(ranks)
        assert train.micro_batch_size * ranks * train.grad_accum == config.train.global_batch_size


def test_a_global_batch_size_sets_grad_accum_for_each_rank_count():
    from dyt.train.cli import check_machine

    train = TrainConfig(micro_batch_size=4, global_batch_size=64)
    assert [train.for_world(n).grad_accum for n in (1, 2, 8, 16)] == [16, 8, 2, 1]
    assert train.for_world(8).derived_deepspeed_config()["gradient_accumulation_steps"] == 2
    assert TrainConfig(grad_accum=3).for_world(5).grad_accum == 3  # none set: grad_accum as given
    with pytest.raises(ConfigError, match=r"train.global_batch_size=64 on 3 rank\(s\) at train.micro_batch_size=4: 16 "
                                          r"micro-batches per step do not split evenly over 3 ranks; launch 1, 2, 4, 8, "
                                          r"16 rank\(s\), or, to train on 3 \(no train.micro_batch_size splits 64 "
                                          r"over 3\), set train.global_batch_size to a multiple of 12 \(60 or 72;"):
        train.for_world(3)
    with pytest.raises(ConfigError, match=r"launch 1, 2, 4, 8, 16 rank\(s\), or set train.micro_batch_size to 1, 2$"):
        TrainConfig(micro_batch_size=4, global_batch_size=64).for_world(32)  # fewer micro-batches than ranks
    with pytest.raises(ConfigError, match=r"to train on 56 \(no train.micro_batch_size splits 1024 over 56\), .* a multiple of 224 \(896 or 1120;"):
        TrainConfig(micro_batch_size=4, global_batch_size=1024).for_world(56)  # one 8-GPU node of 64 lost
    with pytest.raises(ConfigError, match=r"on 32 rank\(s\)"):  # fewer micro-batches than ranks
        train.for_world(32)
    with pytest.raises(ConfigError, match="train.global_batch_size=64 and train.grad_accum=2 both set the batch"):
        TrainConfig(grad_accum=2, global_batch_size=64)
    with pytest.raises(ConfigError, match="train.global_batch_size=64 is not a multiple of train.micro_batch_size=3"):
        TrainConfig(micro_batch_size=3, global_batch_size=64)
    with pytest.raises(ConfigError, match="global_batch_size"):  # checked before a launch prepares any data
        check_machine(load_config(ToyConfig, None, ["train.global_batch_size=24", "train.micro_batch_size=8"]), 2)
    check_machine(load_config(ToyConfig, None, ["train.global_batch_size=24", "train.micro_batch_size=8"]), 3)


def test_a_path_setting_under_home_is_expanded(tmp_path, monkeypatch):
    """``~`` in a setting (which no shell expands inside ``--set key=~/x`` or a YAML file) and in a
    command's path options means the home folder; it made a folder named ``~`` where the command ran."""
    import argparse

    from dyt.errors import output_file, output_folder, user_path

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "base.yaml").write_text("train:\n  out_dir: ~/runs/a\n")
    (tmp_path / "ds.json").write_text("{}")
    config = load_config(ToyConfig, "~/base.yaml", ["train.deepspeed_config=~/ds.json"])
    assert (config.train.out_dir, config.train.deepspeed_config) == (f"{tmp_path}/runs/a", f"{tmp_path}/ds.json")
    assert load_config(ToyConfig, None, ["train.out_dir=runs/~x"]).train.out_dir == "runs/~x"  # only a leading ~
    assert user_path("~/x") == output_folder("~/x") == tmp_path / "x" and output_file("~/r.json") == tmp_path / "r.json"
    with pytest.raises(argparse.ArgumentTypeError, match="its folder .* does not exist"):
        output_file("~/nowhere/r.json")


def test_an_empty_config_file_is_refused(tmp_path):
    """An empty file (or one of comments) read as every default trained a model nobody chose, and a
    run whose config.yaml was emptied resumed against the defaults; ``{}`` still asks for them."""
    (tmp_path / "empty.yaml").write_text("# settings to come\n")
    with pytest.raises(ConfigError, match="empty.yaml holds no settings"):
        load_config(ToyConfig, tmp_path / "empty.yaml")
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert load_config(ToyConfig, tmp_path / "defaults.yaml") == load_config(ToyConfig, None)


def test_an_option_of_one_value_given_twice_is_refused(capsys):
    """argparse keeps the last of ``--config a.yaml --config b.yaml`` and drops the first without a
    word; the commands' parser refuses it, and leaves options that collect (append) alone."""
    from dyt.errors import CommandParser, DistinctValues, options_given

    parser = CommandParser(prog="cmd")
    config = parser.add_argument("--config")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--seeds", action=DistinctValues, nargs="+", type=int)
    args = parser.parse_args(["--config", "a.yaml", "--set", "x=1", "--set", "y=2", "--fresh", "--seeds", "0", "1"])
    assert (args.config, args.set, args.fresh, args.seeds) == ("a.yaml", ["x=1", "y=2"], True, [0, 1])
    assert parser.parse_args(["--config", "b.yaml"]).config == "b.yaml"  # a new parse starts afresh
    assert options_given(parser, ["--config", "a.yaml"], [config]) == ["--config"]
    for argv, said in ((["--config", "a.yaml", "--conf", "b.yaml"], "argument --config: given twice: give it once (the "
                                                                    "last would be used alone, not merged"),
                       (["--fresh", "--fresh"], "argument --fresh: given twice: give it once\n"),
                       (["--seeds", "0", "--seeds", "1"], "argument --seeds: given twice")):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert said in capsys.readouterr().err
