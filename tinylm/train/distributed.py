"""Data parallelism under ``torchrun``: one process per device, gradients averaged by DDP.

Launched plainly (``tinylm pretrain ...``) everything here is a no-op with rank 0 of 1. Launched as
``torchrun --nproc_per_node=N -m tinylm.cli pretrain ...`` each process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment, joins the process group (nccl on GPUs, gloo on CPUs), and trains on
its own share of the data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinylm.device import resolve_device


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: float | int) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device_name: str = "auto") -> Distributed:
    """Join the process group when launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(0, 1, resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)


def teardown(wait: bool = True) -> None:
    """Leave the process group. With ``wait``, first wait until every process has got here: a process
    that destroys the group while a peer is still working (rank 0 saving the final model, say) can make
    gloo abort that peer or itself ("terminate called without an active exception"), and torchrun then
    kills the rest. After an error nobody waits, since the others may never arrive: torchrun stops them."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(device_name: str = "auto") -> Iterator[Distributed]:
    """``setup`` on entry; on exit ``teardown``, waiting for the other processes unless the block failed."""
    state = setup(device_name)
    try:
        yield state
    except BaseException:
        teardown(wait=False)
        raise
    teardown(wait=True)
