"""The process groups of one rank: the world (the pipeline's point-to-point transfers) and
its stage's tensor-parallel group, built on a shared TCP store without touching
torch.distributed's global default group (so one process may hold several engines)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from peregrine.distributed.layout import ParallelLayout
from peregrine.layers.comm import ParallelGroup


@dataclass
class RankGroups:
    """The groups a rank talks in."""

    world: ParallelGroup
    tp: ParallelGroup

    @property
    def comm_seconds(self) -> float:
        """Seconds spent in collectives and transfers so far, all groups together."""
        return self.world.seconds + (self.tp.seconds if self.tp is not self.world else 0.0)

    @property
    def comm_calls(self) -> int:
        """Collectives and transfers made so far, all groups together."""
        return self.world.calls + (self.tp.calls if self.tp is not self.world else 0)


def backend_for(device: torch.device) -> str:
    """gloo on the CPU, NCCL on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def _process_group(store: dist.Store, prefix: str, rank: int, size: int, device: torch.device,
                   timeout: timedelta) -> dist.ProcessGroup:
    store = dist.PrefixStore(prefix, store)
    if backend_for(device) == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def create_groups(layout: ParallelLayout, store: dist.Store, device: torch.device,
                  timeout: float) -> RankGroups:
    """Join the world group and this rank's tensor-parallel group (every rank calls this
    once, with the same store)."""
    wait = timedelta(seconds=timeout)
    world = ParallelGroup(_process_group(store, "world/", layout.rank, layout.world_size,
                                         device, wait), layout.rank,
                          list(range(layout.world_size)))
    ranks = layout.stage_ranks(layout.stage)
    if layout.tp == 1:
        tp = ParallelGroup(None, 0, ranks)
    elif layout.pp == 1:
        tp = world
    else:
        tp = ParallelGroup(_process_group(store, f"tp{layout.stage}/", layout.tp_rank,
                                          layout.tp, device, wait), layout.tp_rank, ranks)
    return RankGroups(world, tp)
