"""torchrun / DistributedDataParallel support: one process per device."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> World:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``...); a plain launch is a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        store = _attempt_store(world_size)  # None: PyTorch's env:// rendezvous
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=_timeout())
    return World(rank, world_size, local_rank)


def _attempt_store(world_size: int) -> dist.Store | None:
    """Under torchrun, the elastic agent's store seen through a prefix of its own for each restart.

    With torchrun's static rendezvous (``--master-addr``/``--master-port``) the agent keeps one
    store for all restarts, and PyTorch's ``env://`` joins it without a prefix: a restarted group
    then reads the addresses its dead predecessor published and gloo waits for ever in
    ``connectFullMesh``. ``None`` where no agent serves the store (plain launches, Slurm's
    ``srun`` with ``MASTER_ADDR``)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=_timeout() or dist.default_pg_timeout,
    )
    return dist.PrefixStore(f"deitctl/attempt_{attempt}/", store)


def _timeout() -> timedelta | None:
    """``DEITCTL_DIST_TIMEOUT`` seconds for the process group (connecting included), so that a
    process group that cannot form fails and torchrun can restart it; else PyTorch's default."""
    seconds = float(os.environ.get("DEITCTL_DIST_TIMEOUT", "0") or 0)
    return timedelta(seconds=seconds) if seconds > 0 else None


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (stop requests)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_all(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _initialized():
        return [obj]
    out: list[T] = [obj] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
