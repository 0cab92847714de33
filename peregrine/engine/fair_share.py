"""Weighted fair turns for the steps of several engines in one process.

One step runs at a time. Each engine has a virtual time: the seconds its steps took divided
by its share. Of the engines waiting for a turn, the one with the least virtual time goes
next (start-time fair queuing), so over a busy stretch each gets compute in proportion to
its share, and a saturated engine cannot starve a quiet one: the quiet one's next step
waits for at most the step in progress. An engine coming back from idleness starts at the
virtual time of the step last granted, so idleness earns no credit to burst with later."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager


class FairArbiter:
    """Hands out step turns to named engines in weighted fair order (any thread)."""

    def __init__(self, shares: dict[str, float]) -> None:
        if any(s <= 0 for s in shares.values()):
            raise ValueError("every share must be > 0")
        self.shares = dict(shares)
        self._vtime = dict.fromkeys(shares, 0.0)
        self._now = 0.0  # the virtual time of the turn last granted
        self._waiting: dict[str, int] = {}  # name -> arrival order (ties go to the first)
        self._order = itertools.count()
        self._running = False
        self._cond = threading.Condition()
        self.busy_seconds = dict.fromkeys(shares, 0.0)
        """Seconds of steps each engine has run (for tests and benchmarks)."""

    def turn_of(self, name: str) -> Callable[[], AbstractContextManager[None]]:
        """What engine `name` wraps each step in."""
        if name not in self.shares:
            raise KeyError(name)
        return lambda: self.turn(name)

    @contextmanager
    def turn(self, name: str) -> Iterator[None]:
        """Wait for `name`'s turn, run the body as its step, then charge its time."""
        with self._cond:
            self._vtime[name] = max(self._vtime[name], self._now)
            self._waiting[name] = next(self._order)
            while self._running or self._next() != name:
                self._cond.wait()
            del self._waiting[name]
            self._running = True
            self._now = self._vtime[name]
        began = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - began
            with self._cond:
                self._vtime[name] += spent / self.shares[name]
                self.busy_seconds[name] += spent
                self._running = False
                self._cond.notify_all()

    def _next(self) -> str:
        return min(self._waiting, key=lambda n: (self._vtime[n], self._waiting[n]))
