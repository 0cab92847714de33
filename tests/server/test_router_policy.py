"""The model router's decisions, on fake engines: routing, load on demand, LRU eviction under
--max-loaded-models and --memory-budget, busy and pinned models kept, keep-alive, admin."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from peregrine.config import EngineConfig
from peregrine.server.args import ServerArgs
from peregrine.server.errors import APIError
from peregrine.server.metrics import ServerMetrics
from peregrine.server.model_entries import ModelEntry
from peregrine.server.router import ModelRouter


class FakeEngine:
    """What the router asks of an engine; loads when `gate` opens (at once without one)."""

    def __init__(self, name: str, log: list[tuple[str, str]], gate: threading.Event | None,
                 fail: bool) -> None:
        self.name, self.log, self.gate, self.fail = name, log, gate, fail
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.live = 0
        self.stopped = False

    def start(self) -> None:
        self.log.append(("load", self.name))

        def load() -> None:
            if self.gate is not None:
                self.gate.wait(10)
            if self.fail:
                self.load_error = RuntimeError("weights are corrupt")
            self.loaded.set()
        threading.Thread(target=load, daemon=True).start()

    @property
    def is_ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None and not self.stopped

    @property
    def num_live(self) -> int:
        return self.live

    @property
    def num_waiting(self) -> int:
        return 0

    def shutdown(self, timeout: float | None = None) -> None:
        self.stopped = True
        self.log.append(("unload", self.name))

    def stats(self) -> None:
        return None

    def abort_all(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A router over fake engines named a, b, c, ... with a fake clock and an event log."""

    def __init__(self, memory: list[int] | None = None, pinned: tuple[str, ...] = (),
                 gates: dict[str, threading.Event] | None = None,
                 failing: tuple[str, ...] = (), **limits: Any) -> None:
        memory = memory or [100, 100, 100]
        self.log: list[tuple[str, str]] = []
        self.clock = Clock()
        self.engines: dict[str, list[FakeEngine]] = {}
        gates = gates or {}
        self.failing = set(failing)

        def factory(config: EngineConfig, metrics: ServerMetrics) -> Any:
            name = metrics.model_name
            engine = FakeEngine(name, self.log, gates.get(name), name in self.failing)
            self.engines.setdefault(name, []).append(engine)
            return engine
        names = "abcdefgh"[:len(memory)]
        entries = [ModelEntry(n, EngineConfig(), [n.upper()], n in pinned, memory_bytes=m)
                   for n, m in zip(names, memory)]
        args = ServerArgs(embedding_model=None, **{"keep_alive": 0.0, **limits})
        self.router = ModelRouter.build(entries, args, factory, self.clock)

    def engine(self, name: str) -> FakeEngine:
        return self.engines[name][-1]

    def states(self) -> dict[str, str]:
        return {s.name: s.state for s in self.router.slots}

    async def start(self) -> None:
        self.router.start()
        await self.router.load("a")

    async def use(self, name: str | None, at: float) -> str:
        """A request for `name` at time `at`: returns the model it ran on."""
        self.clock.now = at
        async with self.router.lease(name) as ctx:
            return ctx.model_name


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_routes_by_served_name_and_alias_and_defaults_to_the_first():
    async def main() -> None:
        h = Harness()
        await h.start()
        assert await h.use("b", 1) == "b"
        assert await h.use("C", 2) == "c"  # an alias
        assert await h.use(None, 3) == "a"
        assert await h.use("", 4) == "a"
        with pytest.raises(APIError) as e:
            await h.use("nope", 5)
        assert e.value.status == 404 and e.value.code == "model_not_found"
        assert "`a`, `b`, `c`" in e.value.message
        assert h.states() == {"a": "loaded", "b": "loaded", "c": "loaded"}
        await h.router.shutdown()
    run(main())


def test_max_loaded_models_evicts_the_least_recently_used_idle_model():
    async def main() -> None:
        h = Harness(max_loaded_models=2)
        await h.start()                  # a
        await h.use("b", 1)              # a, b
        await h.use("a", 2)              # a used after b: b is the least recent
        await h.use("c", 3)
        assert h.states() == {"a": "loaded", "b": "unloaded", "c": "loaded"}
        # the old model went before the new one started loading
        assert h.log[-2:] == [("unload", "b"), ("load", "c")]
        await h.use("b", 4)              # a (t=2) is older than c (t=3)
        assert h.states() == {"a": "unloaded", "b": "loaded", "c": "loaded"}
        assert len(h.engines["b"]) == 2  # loaded again on a new engine
        await h.router.shutdown()
    run(main())


def test_memory_budget_evicts_until_the_new_model_fits():
    async def main() -> None:
        # a 60 + b 30 fit in 100; c (50) needs a gone (the LRU), then 30 + 50 fit
        h = Harness(memory=[60, 30, 50], memory_budget=100)
        await h.start()
        await h.use("b", 1)
        assert h.states() == {"a": "loaded", "b": "loaded", "c": "unloaded"}
        await h.use("b", 2)
        await h.use("c", 3)
        assert h.states() == {"a": "unloaded", "b": "loaded", "c": "loaded"}
        # two must go for a 60 after c (50) was used last: b (LRU) first, still too big, then c
        h.clock.now = 4
        await h.use("a", 5)
        assert h.states() == {"a": "loaded", "b": "unloaded", "c": "unloaded"}
        await h.router.shutdown()
    run(main())


def test_a_model_larger_than_the_budget_is_refused_at_startup():
    with pytest.raises(ValueError, match="memory-budget"):
        Harness(memory=[200, 10], memory_budget=100)


def test_busy_models_are_never_evicted_and_the_new_load_gets_503():
    async def main() -> None:
        h = Harness(max_loaded_models=1)
        await h.start()
        h.engine("a").live = 1  # a stream is still running on a
        with pytest.raises(APIError) as e:
            await h.use("b", 1)
        assert e.value.status == 503 and e.value.code == "model_capacity"
        assert e.value.headers["Retry-After"]
        assert h.states() == {"a": "loaded", "b": "unloaded", "c": "unloaded"}
        h.engine("a").live = 0
        assert await h.use("b", 2) == "b"
        await h.router.shutdown()
    run(main())


def test_a_request_inside_its_route_holds_the_model():
    async def main() -> None:
        h = Harness(max_loaded_models=1)
        await h.start()
        async with h.router.lease("a"):  # e.g. still tokenizing: nothing in the engine yet
            with pytest.raises(APIError) as e:
                await h.use("b", 1)
            assert e.value.status == 503
        assert await h.use("b", 2) == "b"
        await h.router.shutdown()
    run(main())


def test_pinned_models_stay():
    async def main() -> None:
        h = Harness(pinned=("b",), max_loaded_models=2)
        await h.start()
        assert h.states()["b"] == "loading" or h.states()["b"] == "loaded"  # preloaded
        await h.use("b", 1)
        await h.use("c", 2)  # a is evicted, not the pinned b (older)
        assert h.states() == {"a": "unloaded", "b": "loaded", "c": "loaded"}
        await h.router.shutdown()
    run(main())


def test_requests_for_a_loading_model_wait_for_one_load_while_others_are_served():
    async def main() -> None:
        gate = threading.Event()
        h = Harness(gates={"b": gate})
        await h.start()
        waiting = [asyncio.ensure_future(h.use("b", 1)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert h.states()["b"] == "loading" and not any(w.done() for w in waiting)
        assert await h.use("a", 2) == "a"  # another model is not held up
        gate.set()
        assert await asyncio.gather(*waiting) == ["b"] * 3
        assert len(h.engines["b"]) == 1 and h.log.count(("load", "b")) == 1
        await h.router.shutdown()
    run(main())


def test_a_loading_model_is_not_evicted():
    async def main() -> None:
        gate = threading.Event()
        h = Harness(gates={"b": gate}, max_loaded_models=2)
        await h.start()
        loading = asyncio.ensure_future(h.use("b", 1))
        await asyncio.sleep(0.1)
        h.clock.now = 2
        await h.use("c", 2)  # room is made from a (idle), not from the loading b
        assert h.states()["a"] == "unloaded" and h.states()["b"] == "loading"
        gate.set()
        await loading
        await h.router.shutdown()
    run(main())


def test_keep_alive_unloads_idle_unpinned_models_only():
    async def main() -> None:
        h = Harness(pinned=("c",), keep_alive=10.0)
        await h.start()
        h.router._sweeper.cancel()  # the test calls what the sweeper would, on its own clock
        await h.use("b", 1)
        await h.use("c", 1)
        h.clock.now = 5
        assert await h.router.unload_idle() == []
        h.engine("b").live = 1  # b is busy at 12: its idleness starts over
        h.clock.now = 12
        assert await h.router.unload_idle() == ["a"]
        h.engine("b").live = 0
        h.clock.now = 21
        assert await h.router.unload_idle() == []
        h.clock.now = 22
        assert await h.router.unload_idle() == ["b"]
        assert h.states() == {"a": "unloaded", "b": "unloaded", "c": "loaded"}
        await h.router.shutdown()
    run(main())


def test_admin_unload_refuses_a_busy_model_and_load_retries_a_failed_one():
    async def main() -> None:
        h = Harness(failing=("b",))
        await h.start()
        h.engine("a").live = 2
        with pytest.raises(APIError) as e:
            await h.router.unload("a")
        assert e.value.status == 409 and e.value.code == "model_busy"
        h.engine("a").live = 0
        assert (await h.router.unload("A")).state == "unloaded"
        with pytest.raises(APIError) as e:
            await h.use("b", 1)
        assert e.value.status == 503 and "weights are corrupt" in e.value.message
        with pytest.raises(APIError):  # a failed load stays failed until loaded by hand
            await h.use("b", 2)
        assert h.log.count(("load", "b")) == 1
        h.failing.clear()  # the weights were fixed
        assert (await h.router.load("b")).state == "loaded"
        assert h.log.count(("load", "b")) == 2
        await h.router.shutdown()
    run(main())
