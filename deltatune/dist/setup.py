"""The process group of a data-parallel run, from torchrun's environment.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every
process it starts; ``init_world`` joins them into one group: NCCL when the run is on CUDA, gloo
otherwise (the CPU; gloo has every collective FSDP2 and DDP use: all-gather, reduce-scatter,
all-reduce, broadcast).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["World", "init_world", "close_world", "env_world_size"]


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes (one process: 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    owned: bool = False
    """Whether ``init_world`` created the process group (it stays open for later runs of the process and
    is destroyed at exit, or by ``close_world``)."""

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over all processes (every process must call it); as given for one process."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        """The largest ``value`` of all processes (every process must call it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        """Wait until every process got here."""
        if self.size > 1:
            dist.barrier()

    def mine(self, items: list) -> list:
        """This process's share of ``items``: the ``rank``-th of ``size`` equal consecutive parts."""
        if len(items) % self.size:
            raise ValueError(f"{len(items)} items do not split evenly over {self.size} processes")
        part = len(items) // self.size
        return items[self.rank * part:(self.rank + 1) * part]

    def device(self, device: torch.device) -> torch.device:
        """The device this process uses for ``device``: on CUDA its own GPU (``cuda:LOCAL_RANK``), made current."""
        if self.size > 1 and device.type == "cuda":
            device = torch.device("cuda", device.index if device.index is not None else self.local_rank)
            torch.cuda.set_device(device)
        return device


def env_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 when not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init_world(device: torch.device) -> World:
    """Join the process group torchrun describes (or the one already initialized); one process: ``World()``.

    ``device``: the run's device; CUDA picks NCCL, anything else gloo. Raises ``ValueError`` when the
    environment names a world of several processes without a rank."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                     dist.get_backend(), owned=False)
    size = env_world_size()
    if size <= 1:
        return World()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {missing} not set: start data-parallel runs with "
                         f"torchrun --nproc-per-node N -m deltatune.cli train ...")
    backend = "nccl" if device.type == "cuda" else "gloo"
    local = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(device.index if device.index is not None else local)
    dist.init_process_group(backend)
    atexit.register(_destroy)  # a second run in this process joins the same group (joining anew can hang)
    return World(dist.get_rank(), dist.get_world_size(), local, backend, owned=True)


def close_world(world: World) -> None:
    """Destroy the process group if ``init_world`` created it."""
    if world.owned:
        _destroy()


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
