"""Batching of embedding work: inputs from concurrent callers that arrive while a batch runs
wait in a queue and go together in the next one (the /v1/embeddings route and the
semantic cache's lookups)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
# Most inputs one batch takes from the queue: a large request cannot hold a small one back
# for longer than a batch this size.
_MAX_BATCH_INPUTS = 256


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future[torch.Tensor]


@dataclass
class EmbeddingBatcher(Generic[T]):
    """Queues inputs from concurrent requests and runs them in batches: whatever waits when
    the previous batch ends goes together (up to `max_inputs` inputs)."""

    run: Callable[[list[T]], Awaitable[torch.Tensor]]
    """Embeds a batch: one row per item, in order."""
    max_inputs: int = _MAX_BATCH_INPUTS
    batches: int = 0
    """Batches run so far (tests and logs)."""
    _queue: list[_Pending[T]] = field(default_factory=list)
    _worker: asyncio.Task[None] | None = None

    async def embed(self, items: list[T]) -> list[torch.Tensor]:
        """One embedding per item, once the batches holding them ran."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future()) for item in items]
        self._queue.extend(pending)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        finally:
            for p in pending:  # a cancelled request leaves nothing to compute
                p.future.cancel()

    async def _drain(self) -> None:
        while self._queue:
            # Requests that went away while waiting are dropped here.
            self._queue = [p for p in self._queue if not p.future.done()]
            batch, self._queue = self._queue[:self.max_inputs], self._queue[self.max_inputs:]
            if not batch:
                return
            self.batches += 1
            try:
                rows = await self.run([p.item for p in batch])
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, row in zip(batch, rows):
                if not p.future.done():
                    p.future.set_result(row)
