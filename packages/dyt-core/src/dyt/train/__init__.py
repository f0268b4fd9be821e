"""The shared training harness (install ``dyt-core[train]``): config dataclasses and CLI, DeepSpeed
engine set-up for the deepspeed launcher / torchrun / plain python, resumable data order, atomic
checkpoints, JSONL + TensorBoard metrics, progress bar. See docs/architecture.md."""

from .checkpoint import trained_weights
from .cli import parse_args, run_recipe
from .config import ConfigError, TrainConfig, dump_yaml, from_dict, load_config, to_dict
from .distributed import DistInfo, init_distributed
from .metrics import read_metrics
from .trainer import NonFiniteLossError, Task, Trainer, TrainResult, deepspeed_config, warmup_cosine

__all__ = [
    "ConfigError",
    "DistInfo",
    "NonFiniteLossError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "deepspeed_config",
    "dump_yaml",
    "from_dict",
    "init_distributed",
    "load_config",
    "parse_args",
    "read_metrics",
    "run_recipe",
    "to_dict",
    "trained_weights",
    "warmup_cosine",
]
