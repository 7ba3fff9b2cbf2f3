"""One run over several processes with `torchrun`: the meta-batch is split across ranks and the
meta-gradients are all-reduced (torch.distributed: gloo on CPUs, NCCL on GPUs).

Every rank draws the same full meta-batch from the same seeded generator (sampling is a cheap
device-side gather) and keeps its own contiguous slice of tasks; the mean of the ranks' mean
gradients is then the single-process meta-gradient, so a W-process run follows the 1-process
run's parameters to float tolerance. Rank 0 alone writes the run directory (logs, checkpoints,
results.json) and validates; every rank reads last.pt on resume.

    torchrun --nproc-per-node 2 -m metalearn.cli train algo=maml data=omniglot
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from metalearn.errors import ConfigError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Group:
    """This process's place in the run: rank `rank` of `world` processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes, validates and tests."""
        return self.rank == 0

    def shard(self, batch: Any, meta_batch_size: int) -> Any:
        """This rank's contiguous slice of a (full) meta-batch."""
        if self.world == 1:
            return batch
        per = meta_batch_size // self.world
        return batch[self.rank * per : (self.rank + 1) * per]

    def check_divides(self, meta_batch_size: int, key: str) -> None:
        if meta_batch_size % self.world:
            raise ConfigError(
                f"{key}={meta_batch_size} does not split evenly across {self.world} processes; "
                f"use a multiple of {self.world} (or another --nproc-per-node)"
            )

    def average_gradients(self, params: list[torch.nn.Parameter], scalars: torch.Tensor):
        """All-reduce the gradients (one flat buffer, one collective) and `scalars` (the logged
        loss and score); both become the mean over ranks. Returns the averaged scalars."""
        if self.world == 1:
            return scalars
        with_grad = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad] + [scalars.reshape(-1)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in with_grad:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        return flat[offset:].view_as(scalars)

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Start every rank from rank 0's weights (they are seeded alike; this makes it sure)."""
        if self.world > 1:
            for p in params:
                dist.broadcast(p.data, src=0)

    def agree(self, flag: bool) -> bool:
        """Rank 0's value of a decision every rank must share (stop for the time budget)."""
        if self.world == 1:
            return flag
        value = [flag]
        dist.broadcast_object_list(value, src=0)
        return bool(value[0])

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the run directory, say)."""
        if self.world == 1:
            return obj
        value = [obj]
        dist.broadcast_object_list(value, src=0)
        return value[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


SINGLE = Group()


def init(device_kind: str) -> Group:
    """Join the torchrun process group (once per process); a plain run gets SINGLE."""
    if not launched():
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
    return Group(rank=dist.get_rank(), world=dist.get_world_size())


def shutdown() -> None:
    """Leave the process group, together: a rank that tears its connections down while another
    still uses them makes gloo abort that one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
