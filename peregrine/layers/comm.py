"""A group of ranks that split a model, the collectives the parallel layers call on it, and
the seconds spent inside them (what the benchmarks report as communication).

The group wraps a backend process group object (gloo on CPU, NCCL on CUDA) created by
peregrine/distributed without torch.distributed's global default group, so several
parallel engines can live in one process."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class ParallelGroup:
    """Ranks `ranks` (global) with this process at `rank` (its index among them)."""

    def __init__(self, pg: dist.ProcessGroup | None, rank: int, ranks: list[int]) -> None:
        self.pg = pg  # None for a group of one: every collective is the identity
        self.rank = rank
        self.ranks = ranks
        self.seconds = 0.0  # spent in this group's collectives, waiting for peers included
        self.calls = 0  # collectives and transfers made (none in a group of one)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; returns it."""
        if self.pg is None:
            return x
        t0 = time.perf_counter()
        self.pg.allreduce([x]).wait()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (equal shapes) on the group's first rank, in rank order; None
        elsewhere."""
        if self.pg is None:
            return [x]
        t0 = time.perf_counter()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        x = x.contiguous()
        outs = [[torch.empty_like(x) for _ in self.ranks]] if self.rank == 0 else []
        self.pg.gather(outs, [x], opts).wait()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return outs[0] if self.rank == 0 else None

    def send(self, x: torch.Tensor, dst: int) -> dist.Work:
        """Start sending `x` (contiguous) to group rank `dst`; keep x unchanged until the
        returned work is waited on."""
        t0 = time.perf_counter()
        work = self.pg.send([x], dst, 0)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return work

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             src: int) -> torch.Tensor:
        """A tensor of `shape` received from group rank `src` (blocks until it arrives)."""
        t0 = time.perf_counter()
        x = torch.empty(shape, dtype=dtype, device=device)
        self.pg.recv([x], src, 0).wait()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return x
