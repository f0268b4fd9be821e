"""Process-group set-up that works under the deepspeed launcher, torchrun, and plain ``python``."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from ..errors import UserInputError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    """Ranks on this rank's node (torchrun's ``LOCAL_WORLD_SIZE``, the deepspeed launcher's ``LOCAL_SIZE``)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class LaunchEnvironmentError(UserInputError):
    kind = "launch error"


def launcher_number(*names: str, default: int, least: int) -> int:
    """The first of ``names`` set in the environment (by the deepspeed launcher or torchrun), as a
    whole number of at least ``least``; ``default`` where none is set. Another value is a one-line
    error naming it, not a traceback from deep in the set-up."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        if value.lstrip("-").isascii() and value.lstrip("-").isdigit() and int(value) >= least:  # not "²"
            return int(value)
        raise LaunchEnvironmentError(f"{name}={os.environ[name]!r} in the environment: a launcher (deepspeed, torchrun) "
                                     f"sets it to a whole number of at least {least}; unset it to run one process")
    return default


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher's ``--master_port`` or a world of one (the
    OS picks it; two launches at once do not collide on a fixed default such as 29500)."""
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
                          MASTER_PORT=str(free_port()))
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR: DeepSpeed picks its accelerator at import

    if not torch.distributed.is_initialized():
        if not use_cuda:
            load_cpu_communication_op()
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
        if not use_cuda:
            _unlink_shm_allreduce_buffer()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = launcher_number("LOCAL_RANK", default=0, least=0)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    local_world = launcher_number("LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=1, least=1)
    return DistInfo(rank, world, local_rank, device, local_world)


def leave_process_group() -> None:
    """Destroy this process's process group, where it joined one, while the interpreter is whole.
    Left to the interpreter's exit, gloo's worker threads could still hold the last collectives'
    work, whose tensors then met a half torn-down interpreter: a 2-rank CPU run that had trained and
    saved aborted at exit now and then ("terminate called without an active exception", exit -6).
    Only where every rank gets here together (a finished run, an error every rank raised at once):
    a rank destroying its group while another still waits in a collective can hang."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_process(status: int = 0) -> NoReturn:
    """End a launch's process now with exit ``status``, without the interpreter's teardown: a finished
    run (0), one every rank stopped together with an error it has printed (2), or the rank whose own
    error (its traceback printed) the others stopped with (1). DeepSpeed
    keeps its process groups referenced (its ``groups`` module, the engine), so even after
    :func:`leave_process_group` gloo's groups outlived it into the interpreter's finalization, and a
    rank that had trained and saved aborted there now and then ("terminate called without an active
    exception", exit -6: 1 launch in about 50 of the 2-rank tests, CI 2026-12-07 11:17). Every file
    the run writes is closed by then; output and logging are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def load_cpu_communication_op() -> bool:
    """Load DeepSpeed's CPU communication op (building it the first time) holding the build folder's
    kernel lock (:func:`dyt.kernels.cpp_build.held_build_folder`), before ``deepspeed.init_distributed``
    loads it without one. torch takes a plain ``lock`` file in that folder on every load, even of a
    built op, and a process killed meanwhile (a run stopped as it started) left it: each later CPU run
    then waited on it forever without a word. Holding the kernel lock, such a leftover is removed, and
    ranks load one at a time. Once a load has stamped the build (:func:`dyt.kernels.cpp_build.record_built`),
    later ranks import its library directly, as for DyT's own kernels. DeepSpeed keeps the module, so
    its own load finds it. False where the op does not suit this CPU (DeepSpeed then reduces through
    gloo alone)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from dyt.kernels.cpp_build import CpuExtension, held_build_folder, load_built, record_built

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False  # deepspeed.comm.torch.build_shm_op's own test
    loaded = builder._loaded_ops  # OpBuilder's modules by name, which its load() returns when there
    if builder.name in loaded:
        return True
    folder = CpuExtension.build_folder(builder.name)
    try:
        made_of = _communication_op_made_of(builder)
    except OSError:  # sources not where DeepSpeed's builder says (an install without csrc): no stamp
        made_of = None
    built = None if made_of is None else load_built(folder, made_of=made_of)
    if built is not None:
        loaded[builder.name] = built
        return True
    with held_build_folder(folder):
        module = builder.load()
        if made_of is not None:
            record_built(folder, module, made_of=made_of)
    return True


def _communication_op_made_of(builder) -> str:
    """A digest of what DeepSpeed's build of ``builder`` is made of: every file in its sources' and
    include folders (headers too: ninja's dependency files caught an edited header, a stamp must as
    well), its flags, and the DeepSpeed and torch it is built for. The op's folder has no digest in
    its name (two environments sharing the cache build it there in turn), so a stamp there must say
    which build it is for."""
    import deepspeed

    from dyt.kernels.cpp_build import torch_identity

    folders = {Path(builder.deepspeed_src_path(source)).parent for source in builder.sources()}
    folders |= {Path(builder.deepspeed_src_path(path)) for path in builder.include_paths()}
    made_of = hashlib.sha256()
    for folder in sorted(folders):
        for file in sorted(path for path in folder.rglob("*") if path.is_file()):
            made_of.update(str(file).encode() + b"\0" + file.read_bytes())
    for part in (*builder.cxx_args(), *builder.extra_ldflags(), deepspeed.__version__,
                 str(Path(deepspeed.__file__).resolve().parent), *torch_identity()):
        made_of.update(b"\0" + str(part).encode())
    return made_of.hexdigest()


SHM_DIR = Path("/dev/shm")


def shm_allreduce_buffer(master_addr: str, master_port: str, rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU accelerator creates for ``rank``'s all-reduce
    workspace when all ranks share a machine (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: 66 MiB, named
    by user, the launch's master address and port, and rank)."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's name of DeepSpeed's shared all-reduce workspace once every rank has mapped
    every other rank's (the barrier: each rank maps them all inside ``deepspeed.init_distributed``).
    DeepSpeed never unlinks them, so each CPU launch left world size x 66 MiB of RAM in /dev/shm
    until reboot (132 files, 8.6 GiB, on the dev box after a few days of tests). The mappings stay
    valid; the memory goes back when the last rank exits."""
    if os.environ.get("LOCAL_SIZE") != str(torch.distributed.get_world_size()):
        return  # DeepSpeed's own condition for the shared workspace: every rank on this machine
    torch.distributed.barrier()
    shm_allreduce_buffer(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                         torch.distributed.get_rank()).unlink(missing_ok=True)


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: NCCL (the group on CUDA) takes
    CUDA tensors only (a CPU tensor raises "No backend type associated with device type cpu"),
    gloo takes CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a copy of ``value`` (sum, mean, min or max), on ``value``'s device whatever device
    the group reduces on."""
    out = value.detach().to(collective_device(), copy=True)
    reduce_op = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}[op]
    torch.distributed.all_reduce(out, op=getattr(torch.distributed.ReduceOp, reduce_op))
    if op == "mean":
        out /= torch.distributed.get_world_size()
    return out.to(value.device)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce): how the ranks agree to stop together
    where one rank alone met a problem, rather than leaving the others in the next collective."""
    return all_reduce(torch.tensor([float(flag)], dtype=torch.float64), "max").item() == 1


def failures_agreed(error: BaseException | None, words: str | None = None) -> list[tuple[int, str]]:
    """Every rank's failure at this point, known on every rank: ``[]`` where no rank's ``error`` is set
    (one all-reduce; the words are gathered only when some rank failed), else ``(rank, words)`` of each
    rank that failed, ``words`` (by default ``"Type: message"``) on one line and cut to 300 characters."""
    if not any_rank(error is not None):
        return []
    said = " ".join((words or f"{type(error).__name__}: {error}").split())[:300] if error is not None else None
    everyone: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, said)
    return [(rank, cause) for rank, cause in enumerate(everyone) if cause is not None]


def all_gather(value: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``value``, in rank order, on ``value``'s device."""
    mine = value.detach().to(collective_device())
    everyone = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, mine)
    return [t.to(value.device) for t in everyone]


def barrier() -> None:
    torch.distributed.barrier()


NORMAL_CHUNK = 2**20
"""Elements ``init_normal_`` draws and broadcasts at a time (4 MiB of fp32); a multiple of 16."""


@torch.no_grad()
def init_normal_(param: torch.Tensor, std: float, mean: float = 0.0) -> None:
    """``nn.init.normal_(param, mean, std)``, also for a parameter already cut to this rank's ZeRO-3
    shard (under ``deepspeed.zero.Init``, the harness's ``build_partitioned``, a child module's
    parameters are shards when the parent's ``reset_parameters`` runs), without gathering it.

    Rank 0 of the parameter's group draws the whole parameter's values in the chunks of
    :func:`normal_chunks` and broadcasts each; every rank keeps the part inside its shard. The
    values equal one ``normal_`` over the whole parameter from the same generator state, so the
    weights equal a whole-model build's for the same seed (``tests/test_scale.py`` gathers them),
    while no rank holds more than its shard and one chunk: peak memory at init goes as
    1 / world size."""
    if not hasattr(param, "ds_id"):
        param.normal_(mean, std)
        return
    group = param.ds_process_group
    rank = torch.distributed.get_rank(group)
    source = torch.distributed.get_global_rank(group, 0)
    shard, numel = param.ds_tensor, param.ds_numel
    first, last = rank * shard.ds_numel, min((rank + 1) * shard.ds_numel, numel)  # this rank's elements
    chunks = list(normal_chunks(numel, NORMAL_CHUNK))
    # On the CPU, as a whole build draws: zero.Init puts tensors made without a device on the accelerator.
    drawn = torch.empty(max(size for _, size in chunks), dtype=shard.dtype, device="cpu")
    sent = drawn if shard.device.type == "cpu" else torch.empty_like(drawn, device=shard.device)
    for start, size in chunks:
        values = sent[:size]
        if rank == 0:
            values.copy_(drawn[:size].normal_(mean, std))
        torch.distributed.broadcast(values, source, group=group)
        low, high = max(start, first), min(start + size, last)
        if low < high:
            shard[low - first:high - first].copy_(values[low - start:high - start])


def normal_chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, size) pieces of ``numel`` elements that ``normal_`` can fill one after another with
    the values one ``normal_`` over all of them gives: torch's CPU ``normal_`` draws one uniform per
    element in order, then transforms blocks of 16, and when the size is not a multiple of 16
    redraws and transforms the last 16. Pieces of ``chunk`` elements (a multiple of 16), the last
    one at least 16 long (so its redrawn 16 lie inside it), draw and transform the same numbers."""
    if chunk % 16 or chunk <= 0:
        raise ValueError(f"chunk must be a positive multiple of 16, not {chunk}")
    start = 0
    while start < numel:
        size = numel - start if numel - start < chunk + 16 else chunk
        yield start, size
        start += size
