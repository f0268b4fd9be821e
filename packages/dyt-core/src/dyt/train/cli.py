"""The command line every recipe shares: ``--config FILE``, ``--set key=value``, ``--print-config``,
``--resume``. A recipe's ``__main__`` is ``run_recipe(MyConfig, MyTask, ends_process=True)``.

Bad input (a config key, a data file, ...) stops the command with one line and exit status 2 before
any heavy work; ``user_errors`` is that boundary, shared by every command (see docs/errors.md)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from ..backends import AUTO, BackendUnavailableError, device_arg, select_backend
from ..errors import CommandParser, UserInputError, command, report, user_errors
from ..norms import NormConfig
from .checkpoint import check_fresh_start, check_resume
from .config import ConfigError, dump_yaml, load_config
from .data_files import data_files_once
from .distributed import end_process, launcher_number, leave_process_group
from .trainer import Task, Trainer, TrainResult

C = TypeVar("C")

__all__ = ["UserInputError", "command", "parse_args", "run_recipe", "user_errors"]


def _parser(config_cls: type, prog: str | None) -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=config_cls.__doc__)
    parser.add_argument("--config", help="YAML file with the recipe's settings")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting by its dotted key, e.g. --set model.norm=dyt (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from the newest complete checkpoint, also on another number of ranks; settings that "
             "change the model are an error, the changes allowed (steps, cadences, batch split) are printed",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def parse_args(config_cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None):
    """(resolved config, parsed args). Config errors exit with status 2 and a one-line message."""
    parser = _parser(config_cls, prog)
    args = parser.parse_args(argv)
    with user_errors(parser.prog):
        config = load_config(config_cls, args.config, args.overrides)
    return config, args


def _norm_configs(config: Any, prefix: str = "") -> Iterator[tuple[str, NormConfig]]:
    """Every NormConfig in a recipe config, with its dotted key (``model.norm``)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, NormConfig):
            yield prefix + f.name, value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _norm_configs(value, f"{prefix}{f.name}.")


def check_machine(config: Any, ranks: int) -> None:
    """What the config asks of this machine and a launch of ``ranks`` processes, checked before any
    data is prepared: fp16 needs CUDA (DeepSpeed has no fp16 on CPU), every DyT's backend (its
    ``backend`` key, else ``DYT_BACKEND``) must run on the device the ranks train on, and a
    ``train.global_batch_size`` must split over the ranks."""
    config.train.for_world(ranks)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as dyt.train.distributed picks it
    if config.train.precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision='fp16' needs a CUDA GPU (DeepSpeed runs no fp16 on CPU): "
                          "use fp32 or bf16 here")
    for where, _, error in _backend_problems(config, device):
        raise ConfigError(f"{where}: {error}")


def _backend_problems(config: Any, device: torch.device | str) -> Iterator[tuple[str, NormConfig, Exception]]:
    """(where it is set, NormConfig, why) for every DyT of ``config`` whose backend (its ``backend``
    key, else ``DYT_BACKEND``) cannot run on ``device``."""
    for key, norm in _norm_configs(config):
        if norm.kind != "dyt":
            continue
        try:
            select_backend(norm.backend, device, squash=norm.squash, channel_alpha=norm.alpha_shape == "channel")
        except (BackendUnavailableError, ValueError) as error:
            yield (f"{key}.backend" if norm.backend is not None else "DYT_BACKEND (the default backend)"), norm, error


def backends_for_device(config: Any, device: torch.device | str, run: str) -> None:
    """Give every DyT of ``config`` (``run``'s) whose backend cannot run on ``device`` the backend
    ``auto``, with a warning (once per run and setting): every backend computes the same function,
    and the downstream evals rebuild a run's model on their own ``--device``, so a run trained with
    the fused kernels is evaluated on a laptop, and one trained with the CPU kernels on a GPU."""
    for where, norm, error in _backend_problems(config, device):
        warnings.warn(f"{run}: {where} cannot run here ({error}); the evals use DyT backend 'auto'", stacklevel=2)
        norm.backend = AUTO


def add_device_argument(parser: argparse.ArgumentParser) -> argparse.Action:
    """``--device`` for a command that runs the downstream evals (its eval CLI and its compare alike)."""
    return parser.add_argument("--device", type=device_arg, default="auto",
                               help="where the downstream evals run: auto (a CUDA GPU where torch sees one, else the "
                                    "CPU), cpu, cuda or cuda:N")


def run_recipe(
    config_cls: type[C], make_task: Callable[[C], Task], argv: Sequence[str] | None = None, prog: str | None = None,
    *, ends_process: bool = False,
) -> TrainResult | None:
    """Parse the command line, build the task from the config, train. The config class must have
    a ``train`` field of type :class:`~dyt.train.TrainConfig`. Every config and data error comes
    before the engine is built, as one line (exit status 2); with ``--resume``, so is a change of
    a setting the run's checkpoint fixes (``checkpoint.check_resume``).

    ``ends_process``: the process exits next (a recipe's ``python -m`` main, under a launcher or
    not): once every rank has finished, or has raised the same error together (``raised_together``), its
    process group is destroyed (:func:`~dyt.train.distributed.leave_process_group`), and a finished
    run's process ends at once with status 0 (:func:`~dyt.train.distributed.end_process`), one stopped
    by such an error with status 2 once it has printed the error's line, and the rank whose own error
    (a bug, a GPU out of memory) the others stopped with with status 1 after its traceback."""
    prog = prog or os.path.basename(sys.argv[0])
    with user_errors(prog):
        config, args = parse_args(config_cls, argv, prog)
        if args.print_config:
            sys.stdout.write(dump_yaml(config))
            if (batch := config.train.global_batch_size) is not None:  # type: ignore[attr-defined]
                micro = config.train.micro_batch_size  # type: ignore[attr-defined]
                sys.stdout.write(f"# train.grad_accum is derived by each launch from train.global_batch_size: "
                                 f"{batch} / ({micro} x ranks)\n")
            return None
        data_files = data_files_once(config)  # listed at most once, by the check or by the record
        if args.resume:
            changed = check_resume(config, data_files)
            if changed and os.environ.get("RANK", "0") == "0":
                print(f"--resume: changed since the run's config.yaml: {'; '.join(changed)}", flush=True)
        else:
            check_fresh_start(config)
        check_machine(config, launcher_number("WORLD_SIZE", default=1, least=1))  # set by the deepspeed launcher and torchrun
        task = make_task(config)
        train_cfg: Any = config.train  # type: ignore[attr-defined]
        trainer = Trainer(task, train_cfg, full_config=config, data_files=data_files)
        try:
            result = trainer.fit(resume=args.resume)
        except UserInputError as error:
            if ends_process and error.raised_together:
                with contextlib.suppress(Exception):  # the error's one line, not a failed teardown, is what counts
                    leave_process_group()
                try:
                    report(prog, error)  # the line (rank 0), then SystemExit(2)
                except SystemExit as stop:
                    end_process(stop.code)  # as a finished run: gloo could abort in the teardown, exit -6
                    raise
            raise
        except Exception as error:  # a bug, or a GPU out of memory, that the other ranks stopped with
            if ends_process and getattr(error, "raised_together", False):
                with contextlib.suppress(Exception):
                    leave_process_group()
                traceback.print_exception(error)  # as the interpreter would, then its status
                end_process(1)
            raise
        if ends_process:
            leave_process_group()
            end_process()  # without the interpreter's teardown, where gloo could still abort
        return result
