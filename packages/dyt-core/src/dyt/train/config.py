"""Recipe configs: dataclasses, loaded from YAML, overridden with dotted keys, printed resolved.

A config resolves as fairseq2's do: the recipe's full dataclass defaults, then the file, then the
overrides. A nested section given in part keeps the recipe's own defaults for the rest: with
LLaMA's ``norm`` default ``{kind: rmsnorm, bias: false, alpha_policy: llm}``, ``norm: dyt`` is a
bias-free DyT with the paper's alpha0 table, not ``NormConfig``'s class defaults.

Every key is checked against the dataclass: an unknown key is an error that names it and the valid
keys at that level; a value of the wrong type is an error that names the key and the type wanted; a
number outside the range its field declares (``steps: Annotated[int, Range(ge=1)]``) is an error
that names the key and the range. Checks across fields live in the config's ``__post_init__``; a
dataclass's ``validate()`` runs once the whole config is loaded (``TrainConfig.validate`` reads the
DeepSpeed JSON), so every config error comes before any data is prepared. YAML and JSON syntax
errors name the file, line and column.
A dataclass with a ``SHORTHAND`` class attribute accepts a bare scalar for that field
(``norm: dyt`` means ``norm: {kind: dyt}``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

from ..errors import UserInputError, folder_problem

T = TypeVar("T")


class ConfigError(UserInputError):
    """A config file or override does not fit the recipe's config dataclasses."""

    kind = "config error"


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric config field allows, declared with the field:
    ``steps: Annotated[int, Range(ge=1)] = 100``; checked when the config loads."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return not (
            (self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt)
            or (isinstance(value, float) and not math.isfinite(value))
        )

    def __str__(self) -> str:
        def number(bound: float) -> str:
            return str(int(bound)) if float(bound).is_integer() and abs(bound) < 2**53 else f"{bound:g}"

        low = f"at least {number(self.ge)}" if self.ge is not None else (
            f"greater than {number(self.gt)}" if self.gt is not None else "")
        high = f"at most {number(self.le)}" if self.le is not None else (
            f"less than {number(self.lt)}" if self.lt is not None else "")
        if self.ge is not None and self.le is not None:
            return f"from {number(self.ge)} to {number(self.le)}"
        return " and ".join(part for part in (low, high) if part) or "any finite number"

    def why_not(self, value: float) -> str | None:
        """None for a value in range, else what is wrong with it (``is out of range: it must be ...``)."""
        if value in self:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"is not a finite number: it must be {self}"
        return f"is out of range: it must be {self}"

    def check(self, value: float, key: str) -> None:
        problem = self.why_not(value)
        if problem is not None:
            raise ConfigError(f"{key}: {value!r} {problem}")

    def arg(self, kind: type = int):
        """An argparse ``type=`` that parses ``kind`` and checks this range (for command-line options)."""
        import argparse

        def parse(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
            problem = self.why_not(value)
            if problem is not None:
                raise argparse.ArgumentTypeError(f"{text} {problem}")
            return value

        parse.__name__ = kind.__name__
        return parse


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_ONE = Range(ge=1)
PROBABILITY = Range(ge=0, le=1)
SEED = Range(ge=0, le=2**32 - 1)
"""Seeds: numpy's stop at 2**32 - 1."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of the shared training harness (the ``train:`` section of every recipe)."""

    out_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/."""
    steps: Annotated[int, AT_LEAST_ONE] = 100
    """Optimizer steps, counting any update DeepSpeed skipped (non-finite gradients, fp16 overflows;
    logged as ``skipped_steps``), as Megatron counts iterations: a skipped update moves neither the
    weights nor the LR schedule."""
    micro_batch_size: Annotated[int, AT_LEAST_ONE] = 8
    """Examples per rank per forward."""
    grad_accum: Annotated[int, AT_LEAST_ONE] = 1
    """Micro-batches per optimizer step."""
    global_batch_size: Annotated[int, AT_LEAST_ONE] | None = None
    """Examples per optimizer step over all ranks, whatever their number: each launch derives
    ``grad_accum`` = global_batch_size / (micro_batch_size x ranks), which must divide evenly, so a
    run resumed on fewer or more ranks (a lost node) goes on with the same batch. None: the batch is
    micro_batch_size x ranks x grad_accum."""
    lr: Annotated[float, POSITIVE] = 3e-4
    min_lr: Annotated[float, NON_NEGATIVE] = 3e-5
    """The cosine schedule ends here."""
    warmup_steps: Annotated[int, NON_NEGATIVE] = 10
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.1
    """AdamW decay on matrices; biases, norm parameters and DyT's alpha are never decayed, nor a matrix
    model code marks ``_no_weight_decay`` (Mamba's A_log, HyenaDNA's implicit filter, as published)."""
    betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.95)
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0
    """Gradient-norm clipping; 0: none."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Annotated[int, Range(ge=0, le=3)] = 0
    deepspeed_config: str | None = None
    """A DeepSpeed JSON file merged over the config the harness derives from these settings; read
    and checked when the config loads."""
    seed: Annotated[int, SEED] = 0
    """Model init and data order."""
    log_every: Annotated[int, AT_LEAST_ONE] = 1
    eval_every: Annotated[int, NON_NEGATIVE] = 50
    """Validate every this many steps (and at the end); 0 turns validation off."""
    eval_batches: Annotated[int, AT_LEAST_ONE] = 20
    """At most this many validation micro-batches (of ``eval_micro_batch_size`` examples) per
    validation, over all ranks (batch b on rank b % world size); their examples are spread evenly over
    the whole validation set (all of it when it is smaller), which is stored in document order.
    Neither the examples nor their random draws depend on the world size."""
    eval_micro_batch_size: Annotated[int, AT_LEAST_ONE] | None = None
    """Examples per validation micro-batch; None: ``micro_batch_size``. What validation scores, and
    its draws, follow it: give it the old ``micro_batch_size`` to keep validating as before when a
    resume changes the training micro-batch (halved after an out-of-memory error, say), or a larger
    one than training fits (validation keeps no gradients)."""
    save_every: Annotated[int, NON_NEGATIVE] = 50
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_checkpoints: Annotated[int, AT_LEAST_ONE] = 2
    num_workers: Annotated[int, NON_NEGATIVE] = 0
    """DataLoader worker processes."""
    progress: bool = True
    """Progress bar on rank 0."""
    tensorboard: bool = True
    reuse_freed_memory: bool = True
    """CPU ranks under glibc: freed blocks of every size stay in the heap for the next step
    (:func:`dyt.allocator.keep_freed_blocks`) instead of glibc unmapping each one above 32 MiB and
    faulting its pages in again: measured 0.53-0.87x the step time where tensors pass 32 MiB (+6-19%
    peak resident memory), 0.85-1.01x at the demo's sizes (docs/performance.md). Left alone where
    the environment sets glibc's malloc."""

    HARNESS_KEYS: typing.ClassVar[dict[str, str]] = {
        "train_micro_batch_size_per_gpu": "set train.micro_batch_size",
        "gradient_accumulation_steps": "set train.grad_accum (or train.global_batch_size)",
        "train_batch_size": "set train.global_batch_size (or train.micro_batch_size and train.grad_accum)",
        "optimizer": "set train.lr, train.betas and train.weight_decay (the harness builds AdamW)",
        "scheduler": "set train.lr, train.min_lr and train.warmup_steps (the harness builds the schedule)",
        "bfloat16": "set train.precision (bfloat16 is DeepSpeed's old name of bf16)",
        "amp": "set train.precision",
        "torch_autocast": "set train.precision",
        "data_types.param_dtype": "set train.precision",
        "checkpoint.load_universal": "use --resume, which turns it on when the checkpoint's world size differs",
        "managed_gradient_accumulation": "set train.grad_accum (false makes every micro-batch an optimizer step)",
        "zero_optimization.load_from_fp32_weights": "let resumes load the fp32 master weights (false rebuilds them "
                                                    "from the half-precision copies)",
    }
    """DeepSpeed JSON keys (dotted paths) the harness sets itself, and what to do instead."""

    MIRRORED_KEYS: typing.ClassVar[dict[str, str]] = {
        "bf16.enabled": "precision",
        "fp16.enabled": "precision",
        "zero_optimization.stage": "zero_stage",
        "gradient_clipping": "grad_clip",
    }
    """DeepSpeed JSON keys that restate a train setting: allowed in the JSON only with the value
    that setting derives (``train.*`` is the run's one source of truth)."""

    RESUME_MAY_CHANGE: typing.ClassVar[frozenset[str]] = frozenset({
        "out_dir", "steps", "lr", "min_lr", "warmup_steps", "micro_batch_size", "grad_accum", "global_batch_size",
        "grad_clip", "deepspeed_config", "log_every", "eval_every", "eval_batches", "eval_micro_batch_size",
        "save_every", "keep_checkpoints",
        "num_workers", "progress", "tensorboard", "reuse_freed_memory",
    })
    """Settings ``--resume`` accepts changed (see :func:`resume_changes`). The others are fixed for a
    run: ``betas`` come back with the optimizer state (a new value would be silently ignored) and
    ``weight_decay`` is kept with them as the run's optimizer, ``precision`` and ``zero_stage`` shape the checkpoint, ``seed`` the data
    order. The schedule is rebuilt from the new ``lr``, ``steps``, ``warmup_steps`` and ``min_lr`` at
    the saved step (a smaller ``lr`` from the last good checkpoint is the usual answer to a loss
    spike); the data position is kept in samples, so the batch settings may change too."""

    RESUME_CHANGES_RESULTS: typing.ClassVar[frozenset[str]] = frozenset({
        "steps", "lr", "min_lr", "warmup_steps", "micro_batch_size", "grad_accum", "global_batch_size", "grad_clip",
        "deepspeed_config", "eval_batches", "eval_micro_batch_size", "num_workers", "log_every",
    })
    """Of those, the ones that change a run's numbers: its schedule, its batches, its gradient, the
    examples validation scores and how it batches them (``eval_batches``, ``eval_micro_batch_size``,
    which follows ``micro_batch_size`` where it is None: :meth:`resolved_nulls`), the random crops of
    training's data-loading workers (``num_workers``), the logged rows a report's final training loss
    and throughput are taken from (``log_every``); the rest are cadences, memory and display
    (validating draws from seeds of its own). A comparison refuses a run in its folder trained with
    other values (``dyt.train.compare``)."""

    @property
    def validation_micro_batch_size(self) -> int:
        """Examples per validation micro-batch: ``eval_micro_batch_size``, else ``micro_batch_size``."""
        return self.eval_micro_batch_size or self.micro_batch_size

    def resolved_nulls(self) -> TrainConfig:
        """A copy with ``eval_micro_batch_size`` decided, for :func:`resume_changes`: a resume that
        changes ``micro_batch_size`` under a null one names the change of validation's batches too."""
        return dataclasses.replace(self, eval_micro_batch_size=self.validation_micro_batch_size)

    def derived_deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config these settings give, before any ``deepspeed_config`` file. Under bf16
        at ZeRO-2/3 the micro-batches' gradients are summed in fp32 (DeepSpeed's default sums them in
        bf16: over 256 micro-batches, 1.9e-2 relative error against 1.7e-3); DeepSpeed refuses that
        setting at ZeRO-0 with bf16, and at ZeRO-1 it swaps in another optimizer (``BF16_Optimizer``)
        whose checkpoints the harness does not read, so there the sum stays bf16 (said at launch:
        :meth:`bf16_gradient_sum_warning`)."""
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.grad_clip,
            # DeepSpeed's default (true) replaces torch.nn.functional.linear for the whole process as soon as
            # ZeRO-3 builds or wraps a model (zero.Init); the harness keeps torch's.
            "zero_optimization": {"stage": self.zero_stage, "memory_efficient_linear": False},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
            **({"data_types": {"grad_accum_dtype": "fp32"}} if self.precision == "bf16" and self.zero_stage >= 2 else {}),
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def bf16_gradient_sum_warning(self) -> str | None:
        """A line for launches that sum several micro-batches' gradients in bf16 (ZeRO-0/1; see
        :meth:`derived_deepspeed_config`), else None. Reads ``grad_accum`` as :meth:`for_world` derived it."""
        if self.precision != "bf16" or self.zero_stage >= 2 or self.grad_accum == 1:
            return None
        return (f"warning: train.precision=bf16 at train.zero_stage={self.zero_stage}: DeepSpeed sums the "
                f"{self.grad_accum} micro-batches' gradients of each step in bf16 (relative error growing with "
                "their number); train.zero_stage=2 or 3 sums them in fp32")

    def __post_init__(self) -> None:
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir is empty: give the run a folder of its own")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr:g} is above train.lr={self.lr:g}: the cosine schedule would "
                              "rise from the peak to its end; lower train.min_lr (e.g. a tenth of train.lr)")
        if self.global_batch_size is not None:
            if self.grad_accum != 1:
                raise ConfigError(f"train.global_batch_size={self.global_batch_size} and train.grad_accum="
                                  f"{self.grad_accum} both set the batch (each launch derives grad_accum from the "
                                  "global batch): drop one of them")
            if self.global_batch_size % self.micro_batch_size:
                raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                                  f"train.micro_batch_size={self.micro_batch_size}: no number of ranks and "
                                  "micro-batches makes it")

    def for_world(self, ranks: int) -> TrainConfig:
        """These settings as ``ranks`` processes train them: with ``global_batch_size``, ``grad_accum``
        derived from it (an error naming the rank counts that divide it, where ``ranks`` does not)."""
        if self.global_batch_size is None:
            return self
        accum, left = divmod(self.global_batch_size, self.micro_batch_size * ranks)
        if accum and not left:
            derived = copy.copy(self)  # not dataclasses.replace: __post_init__ refuses grad_accum beside the global batch
            derived.grad_accum = accum
            return derived
        micro_batches = self.global_batch_size // self.micro_batch_size
        fits = [n for n in range(1, micro_batches + 1) if micro_batches % n == 0]
        shown = ", ".join(map(str, fits[:12])) + (", ..." if len(fits) > 12 else "")
        micros = [m for m in range(1, self.global_batch_size // ranks + 1) if self.global_batch_size % (m * ranks) == 0]
        if micros:  # e.g. 64 on 32 ranks at micro-batch 4: micro-batch 1 or 2 splits it
            instead = f"or set train.micro_batch_size to {', '.join(map(str, micros[:8]))}{', ...' if len(micros) > 8 else ''}"
        else:  # e.g. 64 on 3 ranks, or one 8-GPU node of 64 lost: 1024 on 56 ranks
            step = self.micro_batch_size * ranks
            near = [b for b in ((self.global_batch_size // step) * step, (self.global_batch_size // step + 1) * step) if b]
            instead = (f"or, to train on {ranks} (no train.micro_batch_size splits {self.global_batch_size} over "
                       f"{ranks}), set train.global_batch_size to a multiple of {step} ({' or '.join(map(str, near))}; "
                       "--resume accepts it, and the run then trains on that batch)")
        raise ConfigError(f"train.global_batch_size={self.global_batch_size} on {ranks} rank(s) at "
                          f"train.micro_batch_size={self.micro_batch_size}: {micro_batches} micro-batches per "
                          f"step do not split evenly over {ranks} ranks; launch {shown} rank(s), {instead}")

    def validate(self) -> None:
        """``out_dir`` can be a folder; the DeepSpeed JSON exists, parses, is an object, leaves the
        harness's own keys alone and restates a train setting only with that setting's value: a
        conflict is an error naming both."""
        problem = folder_problem(self.out_dir)
        if problem is not None:
            raise ConfigError(f"train.out_dir: {problem}")
        if not self.deepspeed_config:
            return
        extra = read_json_object(self.deepspeed_config, "train.deepspeed_config")
        where = f"{self.deepspeed_config} (train.deepspeed_config)"
        for section in ("zero_optimization", "bf16", "fp16"):
            if section in extra and not isinstance(extra[section], Mapping):
                raise ConfigError(f"{where} sets {section!r} to {json.dumps(extra[section])}, not an object: give "
                                  f"its keys in an object (DeepSpeed reads \"zero_optimization\": true as ZeRO-1, "
                                  "whatever train.zero_stage says)")
        for key, instead in self.HARNESS_KEYS.items():
            if _dotted(extra, key) is not _ABSENT:
                raise ConfigError(f"{where} sets {key!r}, which the harness derives: remove it and {instead}")
        derived = self.derived_deepspeed_config()
        for key, name in self.MIRRORED_KEYS.items():
            given, wanted = _dotted(extra, key), _dotted(derived, key)
            if given is _ABSENT or (given == wanted and isinstance(given, bool) == isinstance(wanted, bool)):
                continue
            raise ConfigError(
                f"{where} sets {key}={json.dumps(given)} but train.{name}={getattr(self, name)!r} gives "
                f"{key}={json.dumps(wanted)}: train.* is the run's one source of truth: set train.{name} and "
                f"remove {key!r} from the file (or make the two agree)"
            )


_ABSENT = object()


def _dotted(data: Mapping[str, Any], key: str) -> Any:
    """``data[a][b]`` for ``key`` ``"a.b"``; ``_ABSENT`` where a part is missing."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def setting_value(config: Any, key: str) -> Any:
    """The plain value (as :func:`to_dict` gives it) of dotted ``key`` in a loaded config; KeyError
    where the config has no such setting."""
    value = _dotted(to_dict(config), key)
    if value is _ABSENT:
        raise KeyError(key)
    return value


def read_json_object(path: str | Path, key: str) -> dict[str, Any]:
    """The JSON object in ``path`` (named by config ``key``), or a ConfigError naming the file and,
    for a syntax error, the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} ({key}): not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}:{error.colno}: invalid JSON in {key}: {error.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} ({key}): expected a JSON object {{...}}, got {type(data).__name__}")
    return data


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _plain(tp: Any) -> Any:
    """``tp`` without its ``Annotated`` ranges."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


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
    if origin is Annotated:
        value = _coerce(args[0], value, key, default)
        for extra in args[1:]:
            if isinstance(extra, Range) and value is not None:
                extra.check(value, key)
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
        # a path under the home folder, as a shell would have expanded it: no shell expands a YAML value
        # or --set key=~/x, and the literal one made a folder named ~ where the command ran
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~/") else str(value)
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


ANOTHER_RECIPES = 3
"""Unknown keys in a config file from which it is named as perhaps another recipe's: one or two are
a typo or a setting of another version, and are named with the valid keys instead."""


def unknown_keys(cls: type, data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of ``data`` that ``cls`` does not have, nested sections included."""
    fields, hints, found = _fields(cls), _hints(cls), []
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            found.append(key)
            continue
        tp = hints[name]
        arms = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
        section = next((a for a in map(_plain, arms) if dataclasses.is_dataclass(a)), None)
        if section is not None and isinstance(value, Mapping):
            found += unknown_keys(section, value, f"{key}.")
    return found


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


def _as_typed(tp: Any, value: Any, raw: str) -> Any:
    """An override's value for a setting of type ``tp``: a string setting keeps the text as typed
    (YAML would read ``0755`` as 493, ``1.10`` as 1.1, ``yes`` as true, and cut `` #...`` as a
    comment), unless it is quoted or is ``null`` for an optional one; anything else as YAML read it."""
    arms = [_plain(a) for a in (typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,))]
    if str not in arms or isinstance(value, (Mapping, list)):
        return value
    if value is None and type(None) in arms:
        return None
    text = raw.strip()
    return value if isinstance(value, str) and text[:1] in ("'", '"') else text


def _set_dotted(data: dict[str, Any], cls: type, key: str, value: Any, raw: str | None = None) -> None:
    """Put ``value`` at dotted ``key`` in the raw mapping, walking ``cls`` to check every part;
    ``raw``, the text ``value`` was read from, is kept as it is for a string setting."""
    parts = key.split(".")
    node, node_type, walked = data, cls, []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(node_type):
            fields = _fields(node_type)
            if part not in fields:
                where = f" under '{'.'.join(walked)}'" if walked else ""
                raise ConfigError(f"unknown key '{key}'; valid keys{where}: {', '.join(fields)}")
            field_type = _plain(_hints(node_type)[part])
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
            if last and inner is not None and isinstance(value, Mapping):
                # a section given as a mapping sets the keys it names, each over the file's: the rest
                # of the file's section stays (a mapping-valued setting, alpha_init, is replaced whole)
                for sub_key, sub_value in value.items():
                    _set_dotted(data, cls, f"{key}.{sub_key}", sub_value)
                if not isinstance(node.get(part), dict | str) and not value:
                    node[part] = {}
                return
        elif typing.get_origin(node_type) in (dict, Mapping):
            next_type = _plain((typing.get_args(node_type) or (Any, Any))[1])
        else:
            raise ConfigError(f"'{'.'.join(walked)}' has no sub-keys (in '{key}')")
        if last:
            node[part] = value if raw is None else _as_typed(next_type, value, raw)
            return
        child = node.get(part)
        if not isinstance(child, dict):
            # A scalar shorthand (``norm: dyt``) deeper keys go under keeps its meaning: {kind: dyt}.
            shorthand = getattr(next_type, "SHORTHAND", None) if dataclasses.is_dataclass(next_type) else None
            child = node[part] = {shorthand: child} if shorthand and child is not None else {}
        node, node_type = child, next_type
        walked.append(part)


def _yaml_error(error: yaml.YAMLError) -> tuple[str, str]:
    """(``:line:column`` (1-based, as editors count) or "", what is wrong) of a YAML syntax error."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = " ".join(str(p) for p in (getattr(error, "context", None), getattr(error, "problem", None)) if p)
    return (f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""), problem or str(error)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last one
    silently, so a config with ``train:`` twice trained with half of what it said."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping (YAML would keep the last silently)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        at, problem = _yaml_error(error)
        raise ConfigError(f"{path}{at}: invalid YAML: {problem}") from None


def validate(config: Any) -> None:
    """Run ``validate()`` of every dataclass in ``config`` (innermost first)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value)
    check = getattr(config, "validate", None)
    if callable(check):
        check()


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys ``--set`` items (``key=value``, as :func:`load_config` takes them) set, in
    order: what a command checks of them before any config loads."""
    return [item.partition("=")[0].strip() for item in overrides]


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                check_files: bool = True) -> T:
    """Defaults of ``cls``, then the YAML file, then ``key=value`` overrides (values parsed as YAML,
    except that a string setting keeps the text as typed);
    then, with ``check_files``, every dataclass's ``validate()`` (files the config names, e.g. the
    DeepSpeed JSON). Evals that read a finished run's ``config.yaml`` pass ``check_files=False``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            raise ConfigError(f"{path} is a folder: give a config file (e.g. recipes/llama/tiny.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _read_yaml(path)
        if loaded is None:  # read as every default, it would train (or resume against) a model nobody chose
            raise ConfigError(f"{path} holds no settings (empty, or comments only): write {{}} in it for every default")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(loaded).__name__}")
        data = loaded
        try:  # report errors against the file (named: e.g. an eval given another recipe's run) before overrides
            from_dict(cls, data)
        except ConfigError as error:
            if len(unknown := unknown_keys(cls, data)) >= ANOTHER_RECIPES:
                raise ConfigError(
                    f"{path}: {len(unknown)} keys this recipe does not have ({', '.join(unknown[:4])}"
                    f"{', ...' if len(unknown) > 4 else ''}): another recipe's config? This command reads a "
                    f"{cls.__name__} (sections {', '.join(_fields(cls))}; the recipe's training command prints its "
                    "keys with --print-config)") from None
            raise ConfigError(f"{path}: {error}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_error(error)[1]}") from None
        _set_dotted(data, cls, key.strip(), value, raw)
    config = from_dict(cls, data)
    if check_files:
        validate(config)
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


class SettingChanges(typing.NamedTuple):
    """How a new config differs from a run's saved one, each change as ``key old -> new``."""

    fixed: list[str]
    """Changes ``--resume`` refuses: the run's checkpoint was made with the old values."""
    allowed: list[str]
    """Changes ``--resume`` accepts (``RESUME_MAY_CHANGE``)."""
    results: list[str]
    """The allowed changes that change what the run trains on or scores (``RESUME_CHANGES_RESULTS``):
    a comparison does not report a run trained so beside runs trained as planned."""


def section_training_reads_none(config: Any, key: str) -> str | None:
    """The section along dotted ``key`` that no training reads (a dataclass whose
    ``TRAINING_READS_NONE`` is True: a recipe's eval settings), or None. A comparison sweeps no key
    in one (its points would train one model each time), and ``--resume`` compares none."""
    value, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        value = getattr(value, part, None)
        if getattr(type(value), "TRAINING_READS_NONE", False):
            return ".".join(parts[: depth + 1])
    return None


def resume_changes(saved: Any, new: Any) -> SettingChanges:
    """The settings that differ between a run's saved config and a new one. A setting may change on
    ``--resume`` when its dataclass names it in a ``RESUME_MAY_CHANGE`` class attribute (TrainConfig
    does); every other one is fixed for a run, so every model key (norm, sizes, vocabulary) is. Of
    those that may change, the ones a dataclass names in ``RESUME_CHANGES_RESULTS`` change a run's
    numbers (its schedule, batches, validation examples); the others (cadences, caches) do not. A
    dataclass whose ``TRAINING_READS_NONE`` is True (a recipe's eval settings) is not compared at all.
    A dataclass with a ``resolved_nulls()`` method compares by what it returns, a copy whose settings
    that ``null`` lets other settings decide are decided: a run that saved ``null`` for a setting
    whose default became a value compares by the model it built."""
    changes = SettingChanges([], [], [])

    def walk(old: Any, cur: Any, prefix: str) -> None:
        if getattr(type(cur), "TRAINING_READS_NONE", False):
            return  # settings of what runs after training (the evals'): no run's checkpoint or numbers depend on them
        if hasattr(cur, "resolved_nulls") and type(old) is type(cur):
            old, cur = old.resolved_nulls(), cur.resolved_nulls()
        may_change = getattr(type(cur), "RESUME_MAY_CHANGE", frozenset())
        changes_results = getattr(type(cur), "RESUME_CHANGES_RESULTS", frozenset())
        for f in dataclasses.fields(cur):
            before, after = getattr(old, f.name), getattr(cur, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(after) and type(before) is type(after):
                walk(before, after, key + ".")
            elif to_dict(before) != to_dict(after):
                shown = f"{key} {json.dumps(to_dict(before))} -> {json.dumps(to_dict(after))}"
                (changes.allowed if f.name in may_change else changes.fixed).append(shown)
                if f.name in may_change and f.name in changes_results:
                    changes.results.append(shown)

    walk(saved, new, "")
    return changes
