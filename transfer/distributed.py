"""Several processes, GPUs or machines training as one: torch.distributed, started by torchrun
(docs/distributed.md says what the processes share and what changes with their number).

With one process (the default) nothing here runs torch.distributed. With more,
:func:`run_processes` has the stage start itself again under torchrun, and each of those
processes joins the group and learns its place in it (:class:`World`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from transfer.errors import ParamError, UserError, say
from transfer.params import DistributedParams, json_digest

#: The label of a stand-in in a step that left a process no image (so that every process takes
#: every step, as DDP needs); CrossEntropyLoss ignores it by default, and no prediction equals it.
IGNORE = -100

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: the whole world is one process
    unless torchrun started this one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs and prints progress."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> Sequence[T]:
        """This process's contiguous share of ``items`` (shares differ in length by one at most)."""
        base, extra = divmod(len(items), self.size)
        start = self.rank * base + min(self.rank, extra)
        return items[start:start + base + (self.rank < extra)]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around ``model`` where there are several processes. Buffers
        (BatchNorm's statistics) only matter in evaluation: :meth:`broadcast_buffers` aligns
        them once before it, instead of before every step."""
        if self.size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=False)

    def sum(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor summed in place over all processes (as it is in one process); the tensors."""
        if self.size > 1:
            for value in values:
                dist.all_reduce(value)
        return values

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every process process 0's buffers (BatchNorm's running statistics)."""
        if self.size > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def broadcast_object(self, value: T) -> T:
        """Process 0's ``value`` on every process (a resume state, a decision)."""
        box = [value]
        if self.size > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value: T) -> list[T] | None:
        """Every process's ``value`` on process 0, by rank; None elsewhere."""
        if self.size == 1:
            return [value]
        received: list[T] | None = [None] * self.size if self.main else None  # type: ignore[list-item]
        dist.gather_object(value, received, dst=0)
        return received

    def gather(self, mine: Iterator[T], rounds: int) -> Iterator[T]:
        """Every process's items on process 0, one from each process per round, for
        ``rounds`` rounds (a process with none left sends nothing); nothing elsewhere."""
        for _ in range(rounds):
            yield from (x for x in self.gather_object(next(mine, None)) or () if x is not None)


def current() -> World:
    """This process's world, from the variables torchrun sets (one process without them)."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return World()
    return World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)))


def check(settings: DistributedParams, device: torch.device, source: str, *, sync_batchnorm: str | None = None) -> None:
    """Fail at start-up, with one line, on a distributed setting this machine cannot run
    (``sync_batchnorm``: the key of a true sync_batchnorm param, if any)."""
    if settings.nproc_per_node * settings.nnodes == 1:  # one process in all
        return
    if settings.nnodes > 1 and not settings.rdzv_endpoint:
        raise ParamError("train.distributed.rdzv_endpoint", "must be host:port, reachable from every node, "
                         f"when nnodes is {settings.nnodes}, got null", source)
    if device.type not in ("cpu", "cuda"):
        raise ParamError("train.distributed.nproc_per_node", f"must be 1 on {device.type}: torch.distributed "
                         "runs on CUDA and the CPU", source)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if device.index is not None:
            raise ParamError("device", f"must be cuda or auto with several processes (each uses the GPU of its "
                             f"local rank), got {device}", source)
        if settings.nproc_per_node > gpus:
            raise ParamError("train.distributed.nproc_per_node", f"is {settings.nproc_per_node}, but this machine "
                             f"has {gpus} CUDA device(s): one process per GPU", source)
    elif settings.backend == "nccl":
        raise ParamError("train.distributed.backend", "nccl needs CUDA; use gloo (or auto) on the CPU", source)
    elif sync_batchnorm:
        raise ParamError(sync_batchnorm, "needs CUDA: torch's SyncBatchNorm does not run "
                         "on the CPU (set it to false)", source)


def torchrun_args(settings: DistributedParams, module: str, argv: Sequence[str], run_id: str) -> list[str]:
    """torchrun's command line for ``python -m module argv`` in every process. One node: a free
    local port (``--standalone``), so that runs side by side never meet; several: c10d at
    ``rdzv_endpoint``, under an id every node derives from the same run."""
    where = (["--standalone"] if settings.nnodes == 1 else
             ["--rdzv-backend", "c10d", "--rdzv-endpoint", settings.rdzv_endpoint, "--rdzv-id", run_id])
    return ["--nnodes", str(settings.nnodes), "--nproc-per-node", str(settings.nproc_per_node), *where,
            "--max-restarts", "0", "--module", module, *argv]


def run_id(*parts: object) -> str:
    """A rendezvous id that every node derives alike from the same run (its mode and params)."""
    return json_digest(parts)


def run_processes(settings: DistributedParams, asked: torch.device, module: str, argv: Sequence[str] | None, *,
                  threads: int, run: str, work: Callable[[World, torch.device], None]) -> None:
    """``work(world, device)`` in this process: alone, or as one of the processes that torchrun
    started, in their group (each process of a CUDA run on the GPU of its local rank).

    Where ``settings`` ask for more processes than this one is among, this process starts them
    instead through torchrun (each runs ``python -m module argv`` again) and returns once all
    have finished; it raises SystemExit with the status of the one that failed by itself, if
    any. The processes print their own lines; torchrun's log is silenced. ``threads`` goes to
    OMP_NUM_THREADS, so that torchrun does not choose one."""
    world = current()
    wanted = settings.nproc_per_node * settings.nnodes  # over all nodes
    if world.size == wanted == 1:
        work(world, asked)
        return
    if world.size == wanted:
        cuda = torch.device("cuda", world.local_rank) if asked.type == "cuda" else None
        name = settings.backend if settings.backend != "auto" else "nccl" if cuda else "gloo"  # auto: by device
        if cuda:
            torch.cuda.set_device(cuda)
        try:
            dist.init_process_group(name, device_id=cuda)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the training processes' group ({name}): {exc}") from None
        try:
            work(world, cuda or asked)
        finally:
            dist.destroy_process_group()
        return
    if world.size > 1:
        raise UserError(f"started as one of {world.size} processes, but train.distributed asks for {wanted}: "
                        "run the stage without torchrun, it starts its own")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ["OMP_NUM_THREADS"] = str(threads)
    for name in list(logging.root.manager.loggerDict):  # each of torchrun's modules sets its own level
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(torchrun_args(settings, module, sys.argv[1:] if argv is None else argv, run)))
    except ChildFailedError as exc:
        # The cause: a process that failed by itself (an error, a traceback), not one that
        # torchrun stopped because another had failed.
        rank, cause = min(exc.failures.items(), key=lambda item: (not 0 < item[1].exitcode < 128, item[0]))
        if cause.exitcode < 0:  # killed by a signal (the kernel's OOM killer, kill -9): nobody else says so
            say(f"error: training process {rank} was killed by signal {-cause.exitcode}")
            raise SystemExit(128 - cause.exitcode) from None
        raise SystemExit(cause.exitcode) from None
    except SignalException as exc:  # torchrun passed the signal on to the processes, which said what they did
        raise SystemExit(128 + int(exc.sigval)) from None
