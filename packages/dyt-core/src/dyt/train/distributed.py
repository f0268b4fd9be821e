"""Process-group set-up that works under the deepspeed launcher, torchrun, and plain ``python``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or, for a plain single process, create) the process group DeepSpeed uses.

    Launchers set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; without one this sets them
    for a world of one. Without CUDA, DeepSpeed runs on its CPU accelerator over gloo.
    """
    if "RANK" not in os.environ:
        # A fresh port, even if MASTER_PORT came inherited: a parent that trained in-process holds
        # the one it set, and a child reusing it fails with EADDRINUSE.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator at import

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a copy of ``value`` (sum, mean, min or max)."""
    out = value.detach().clone()
    reduce_op = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}[op]
    torch.distributed.all_reduce(out, op=getattr(torch.distributed.ReduceOp, reduce_op))
    if op == "mean":
        out /= torch.distributed.get_world_size()
    return out


def barrier() -> None:
    torch.distributed.barrier()


@contextmanager
def whole_parameter(param: torch.Tensor) -> Iterator[torch.Tensor | None]:
    """``param`` whole, for model code that initialises it in place after its module was built.

    Under ZeRO-3's partitioned construction (``deepspeed.zero.Init``, the harness's
    ``build_partitioned``) a child module's parameters are already this rank's shard, an empty
    placeholder, when the parent's ``__init__`` or ``reset_parameters`` runs. This gathers the
    parameter, yields it on rank 0 and None on the others, and on exit sends rank 0's values to
    every rank and re-shards them: only rank 0 draws random numbers, in the order a whole-model build
    draws them, so the weights equal the whole-model build's for the same seed. Without ZeRO-3
    partitioning: ``param`` itself, on every rank. Write ``with whole_parameter(p) as full: if full
    is not None: nn.init.normal_(full, ...)``."""
    if not hasattr(param, "ds_id"):
        yield param
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
        yield param if torch.distributed.get_rank() == 0 else None
