"""Recipe configs: dataclasses, loaded from YAML, overridden with dotted keys, printed resolved.

A config resolves as fairseq2's do: the recipe's full dataclass defaults, then the file, then the
overrides. A nested section given in part keeps the recipe's own defaults for the rest: with
LLaMA's ``norm`` default ``{kind: rmsnorm, bias: false, alpha_policy: llm}``, ``norm: dyt`` is a
bias-free DyT with the paper's alpha0 table, not ``NormConfig``'s class defaults.

Every key is checked against the dataclass: an unknown key is an error that names it and the valid
keys at that level; a value of the wrong type is an error that names the key and the type wanted.
A dataclass with a ``SHORTHAND`` class attribute accepts a bare scalar for that field
(``norm: dyt`` means ``norm: {kind: dyt}``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the recipe's config dataclasses."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of the shared training harness (the ``train:`` section of every recipe)."""

    out_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/."""
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Examples per rank per forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    min_lr: float = 3e-5
    """The cosine schedule ends here."""
    warmup_steps: int = 10
    weight_decay: float = 0.1
    """AdamW decay on matrices; biases, norm parameters and DyT's alpha are never decayed."""
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file merged over the config the harness derives from these settings."""
    seed: int = 0
    log_every: int = 1
    eval_every: int = 50
    """Validate every this many steps (and at the end); 0 turns validation off."""
    eval_batches: int = 20
    """Micro-batches per rank per validation."""
    save_every: int = 50
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    num_workers: int = 0
    """DataLoader worker processes."""
    progress: bool = True
    """Progress bar on rank 0."""
    tensorboard: bool = True


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    """``value`` as type ``tp``, or a ConfigError naming ``key``. A partial mapping for a dataclass
    fills its missing keys from ``default`` (the enclosing field's default) when that is one."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)
        if shorthand is not None and not isinstance(value, Mapping):
            value = {shorthand: value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, prefix=key, base=default if isinstance(default, tp) else None)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, key, default)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_type = args[1] if args else Any
        return {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build ``cls`` from a (possibly partial) nested mapping. Missing keys keep the values of
    ``base`` when given, else the field defaults; a nested dataclass given in part starts from its
    field's default, so a recipe's defaults for a section survive a file or override that sets
    only some of its keys."""
    fields = _fields(cls)
    hints = _hints(cls)
    where = f" under '{prefix}'" if prefix else ""
    kwargs = {}
    for name, value in data.items():
        if name not in fields:
            raise ConfigError(f"unknown key '{prefix + '.' if prefix else ''}{name}'; valid keys{where}: {', '.join(fields)}")
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name, default)
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from error


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config, ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def _set_dotted(data: dict[str, Any], cls: type, key: str, value: Any) -> None:
    """Put ``value`` at dotted ``key`` in the raw mapping, walking ``cls`` to check every part."""
    parts = key.split(".")
    node, node_type, walked = data, cls, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(node_type):
            fields = _fields(node_type)
            if part not in fields:
                where = f" under '{'.'.join(walked)}'" if walked else ""
                raise ConfigError(f"unknown key '{key}'; valid keys{where}: {', '.join(fields)}")
            field_type = _hints(node_type)[part]
            inner = next(
                (a for a in (typing.get_args(field_type) or (field_type,)) if dataclasses.is_dataclass(a)), None
            )
            if last and inner is not None and getattr(inner, "SHORTHAND", None) and not isinstance(value, Mapping):
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                child[inner.SHORTHAND] = value
                return
            next_type = inner if inner is not None else field_type
        elif typing.get_origin(node_type) in (dict, Mapping):
            next_type = (typing.get_args(node_type) or (Any, Any))[1]
        else:
            raise ConfigError(f"'{'.'.join(walked)}' has no sub-keys (in '{key}')")
        if last:
            node[part] = value
            return
        child = node.get(part)
        if not isinstance(child, dict):
            # A scalar shorthand (``norm: dyt``) deeper keys go under keeps its meaning: {kind: dyt}.
            shorthand = getattr(next_type, "SHORTHAND", None) if dataclasses.is_dataclass(next_type) else None
            child = node[part] = {shorthand: child} if shorthand and child is not None else {}
        node, node_type = child, next_type
        walked.append(part)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file, then ``key=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        from_dict(cls, data)  # report errors against the file before overrides are applied
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, cls, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, data)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
