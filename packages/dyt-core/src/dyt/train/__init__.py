"""The shared training harness (install ``dyt-core[train]``): config dataclasses and CLI, DeepSpeed
engine set-up for the deepspeed launcher / torchrun / plain python, resumable data order, atomic
checkpoints, JSONL + TensorBoard metrics, progress bar, one error boundary for every command. See
docs/architecture.md and docs/errors.md."""

from ..errors import UserInputError
from .checkpoint import RunNotFoundError, check_run, load_run_weights, run_model_builder, trained_weights
from .cli import command, parse_args, run_recipe, user_errors
from .config import ConfigError, Range, TrainConfig, dump_yaml, from_dict, load_config, to_dict
from .distributed import DistInfo, init_distributed
from .metrics import read_metrics
from .trainer import (
    BatchReadError,
    CheckpointSaveError,
    ForwardFailedError,
    NonFiniteLossError,
    RunFolderWriteError,
    Task,
    Trainer,
    TrainResult,
    deepspeed_config,
    warmup_cosine,
)

__all__ = [
    "BatchReadError",
    "CheckpointSaveError",
    "ConfigError",
    "DistInfo",
    "ForwardFailedError",
    "NonFiniteLossError",
    "Range",
    "RunFolderWriteError",
    "RunNotFoundError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "UserInputError",
    "check_run",
    "command",
    "deepspeed_config",
    "dump_yaml",
    "from_dict",
    "init_distributed",
    "load_config",
    "load_run_weights",
    "parse_args",
    "read_metrics",
    "run_recipe",
    "to_dict",
    "run_model_builder",
    "trained_weights",
    "user_errors",
    "warmup_cosine",
]
