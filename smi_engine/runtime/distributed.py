"""One process per device under ``torchrun``: which rank this is, and the few collective steps
the runs need (a barrier, agreeing on a value, summing counts).

Outside torchrun everything here is a no-op for a single process.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from smi_engine.runtime.device import resolve_device
from smi_engine.errors import SmiError

TIMEOUT = dt.timedelta(minutes=30)


@dataclass(frozen=True)
class Placement:
    """This process's share of a job: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch: int) -> bool:
        return batch % self.world_size == self.rank

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()


def launcher_value(name: str, default: str | None = None) -> int:
    """A whole number torchrun sets in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), checked."""
    text = os.environ.get(name, default)
    if text is None or not text.strip().isdigit() or (name == "WORLD_SIZE" and int(text) < 1):
        raise SmiError(f"{name}={text!r} in the environment is not a {'count' if name == 'WORLD_SIZE' else 'rank'}: "
                       "launch with torchrun, or unset it")
    return int(text)


def start(device: str = "auto") -> tuple[Placement, torch.device]:
    """This process's placement (from torchrun's environment) and device; joins the process
    group when there are several ranks (NCCL on GPUs, gloo on CPUs)."""
    world = launcher_value("WORLD_SIZE", "1")
    if world == 1:
        return Placement(), resolve_device(device)
    if "RANK" not in os.environ:
        raise SmiError(f"WORLD_SIZE is {world} but RANK is not set: launch with torchrun, or unset WORLD_SIZE")
    placement = Placement(launcher_value("RANK"), world, launcher_value("LOCAL_RANK", "0"))
    if not 0 <= placement.rank < world:
        raise SmiError(f"RANK {placement.rank} is outside 0..{world - 1} (WORLD_SIZE {world}): launch with torchrun")
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        if placement.local_rank >= torch.cuda.device_count():
            raise SmiError(f"rank {placement.rank} has local rank {placement.local_rank} but only "
                           f"{torch.cuda.device_count()} GPUs are visible: lower --nproc-per-node")
        torch_device = torch.device("cuda", placement.local_rank)
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return placement, torch_device


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
