"""Several models behind one API: the request's `model` picks one; a model not loaded loads
on its first request; loading past --max-loaded-models or --memory-budget first unloads the
least recently used idle model that is not pinned; idle models unload after --keep-alive.

A model is busy while a route holds it (a lease, from routing until the response is
built) or its engine has live requests (a stream outlives its route); a busy or loading
model is never unloaded. Decisions to load and unload run one at a time under a lock; the
waits for loads run outside it, so other models keep being served meanwhile.

A LoRA adapter is served as a model of its own name on its base model (docs/lora.md): its
requests route to the base model's engine, tagged with the adapter, and share its batches."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Literal

from peregrine.config import EngineConfig
from peregrine.engine.async_engine import AsyncLLMEngine
from peregrine.engine.fair_share import FairArbiter
from peregrine.lora.adapter import LoRAAdapter
from peregrine.lora.errors import AdapterBusyError, AdapterNotFoundError, InvalidAdapterError
from peregrine.lora.request import LoRARequest
from peregrine.server.args import ServerArgs
from peregrine.server.errors import APIError
from peregrine.server.metrics import ServerMetrics
from peregrine.server.model_entries import ModelEntry
from peregrine.server.serving import ServingContext

logger = logging.getLogger("peregrine.server")

ModelState = Literal["loaded", "loading", "unloaded", "failed"]
EngineFactory = Callable[[EngineConfig, ServerMetrics], AsyncLLMEngine]
# Seconds a client refused for want of room is told to wait (a busy model's requests end).
RETRY_AFTER_S = 5


def new_engine(config: EngineConfig, metrics: ServerMetrics) -> AsyncLLMEngine:
    """An unstarted engine that reports to `metrics`."""
    return AsyncLLMEngine(config, observer=metrics)


def fair_engines(arbiter: FairArbiter) -> EngineFactory:
    """Engines whose steps take turns under `arbiter` (by their model's served name)."""
    def make(config: EngineConfig, metrics: ServerMetrics) -> AsyncLLMEngine:
        return AsyncLLMEngine(config, observer=metrics,
                              step_turn=arbiter.turn_of(metrics.model_name))
    return make


class ModelSlot:
    """One served model: its entry, metrics and serving context (kept across reloads), and
    its engine while loaded."""

    def __init__(self, entry: ModelEntry, args: ServerArgs, factory: EngineFactory,
                 engine: AsyncLLMEngine | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.entry = entry
        self.metrics = metrics or ServerMetrics(entry.name, self._stats)
        self._factory = factory
        # The engine the next load starts; the context points at it while unloaded.
        self._spare = engine or factory(entry.config, self.metrics)
        self.ctx = ServingContext(self._spare, self.metrics, entry.names, args)
        self.adapters: dict[str, ServingContext] = {}  # LoRA adapters served on it, by name
        self.adapter_leases: dict[str, int] = {}
        self.engine: AsyncLLMEngine | None = None
        self.loading: asyncio.Future[None] | None = None
        self.leases = 0
        self.last_used = 0.0
        self.load_seconds: float | None = None
        self.unload_seconds: float | None = None

    def _stats(self):  # noqa: ANN202 - EngineStats | None, for the metrics' gauges
        return None if self.engine is None else self.engine.stats()

    @property
    def name(self) -> str:
        """The served name."""
        return self.entry.name

    @property
    def state(self) -> ModelState:
        """loaded, loading, unloaded, or failed (its load raised; see `ctx.ready()`)."""
        engine = self.engine
        if engine is None:
            return "unloaded"
        if not engine.loaded.is_set():
            return "loading"
        return "failed" if engine.load_error is not None else "loaded"

    @property
    def busy(self) -> bool:
        """A route holds it, or its engine has live requests."""
        return self.leases > 0 or (self.engine is not None and self.engine.num_live > 0)

    def start(self, clock: Callable[[], float]) -> None:
        """Start loading on the spare engine (on the event loop)."""
        engine, self._spare = self._spare, None
        assert engine is not None
        self.engine = engine
        self._use_engine(engine)
        self.last_used = clock()
        began = time.perf_counter()
        engine.start()
        self.loading = asyncio.ensure_future(asyncio.to_thread(engine.loaded.wait))

        def loaded(_: asyncio.Future[None]) -> None:
            self.load_seconds = time.perf_counter() - began
            self.last_used = clock()
        self.loading.add_done_callback(loaded)

    def detach(self) -> AsyncLLMEngine:
        """Take the engine out (the slot reads as unloaded at once); the context moves to a
        new spare so nothing here keeps the old model's memory alive."""
        engine = self.engine
        assert engine is not None
        self.engine, self.loading = None, None
        self._spare = self._factory(self.entry.config, self.metrics)
        self._use_engine(self._spare)
        return engine

    def _use_engine(self, engine: AsyncLLMEngine) -> None:
        self.ctx.use_engine(engine)
        for ctx in self.adapters.values():
            ctx.use_engine(engine)

    def add_adapter(self, request: LoRARequest, args: ServerArgs) -> None:
        """Serve `request`'s adapter on this model under its own name."""
        engine = self.engine or self._spare
        assert engine is not None
        self.adapters[request.lora_name] = ServingContext(
            engine, self.metrics, [request.lora_name], args, lora_request=request)
        self.adapter_leases[request.lora_name] = 0

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name`."""
        del self.adapters[name], self.adapter_leases[name]


class ModelRouter:
    """The served models by name and alias, and when each is loaded."""

    def __init__(self, slots: list[ModelSlot], args: ServerArgs,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not slots:
            raise ValueError("no model to serve")
        self.slots = slots
        self.args = args
        self._clock = clock
        self._by_name: dict[str, ModelSlot] = {}
        for slot in slots:
            for n in slot.entry.names:
                self._by_name.setdefault(n, slot)
        # One model: it loads at startup and stays, and requests during its load get 503
        # (as a single-model server always did). Several: requests wait for their model.
        self.single = len(slots) == 1
        self._lock = asyncio.Lock()
        self._adapter_lock = asyncio.Lock()
        self.adapters: dict[str, ModelSlot] = {}
        """LoRA adapters served as models, by name: the model each runs on."""
        self._sweeper: asyncio.Task[None] | None = None
        self.arbiter: FairArbiter | None = None
        """The fair sharing of steps between the models (None: they step freely)."""
        budget = args.memory_budget
        for slot in self.preload:
            if budget is not None and slot.entry.memory_bytes > budget:
                raise ValueError(f"{slot.name} needs ~{slot.entry.memory_bytes} bytes, more "
                                 f"than --memory-budget {budget}")
        if not self.single and not self._fits(self.preload[0], self.preload[1:]):
            raise ValueError("the default model and the pinned ones do not fit "
                             "--max-loaded-models / --memory-budget together")

    @classmethod
    def build(cls, entries: list[ModelEntry], args: ServerArgs,
              factory: EngineFactory | None = None,
              clock: Callable[[], float] = time.monotonic) -> "ModelRouter":
        """A router over new slots for `entries`; by default on real engines, whose steps
        take turns by share when there are several and --fair-share is on."""
        arbiter = None
        if factory is None:
            factory = new_engine
            if len(entries) > 1 and args.fair_share:
                arbiter = FairArbiter({e.name: e.share for e in entries})
                factory = fair_engines(arbiter)
        router = cls([ModelSlot(e, args, factory) for e in entries], args, clock)
        router.arbiter = arbiter
        return router

    @property
    def default(self) -> ModelSlot:
        """The model a request without `model` gets: the first."""
        return self.slots[0]

    @property
    def preload(self) -> list[ModelSlot]:
        """What loads at startup: the default model and the pinned ones."""
        return [self.default, *(s for s in self.slots[1:] if s.entry.pinned)]

    # --- routing -----------------------------------------------------------------------------
    def resolve(self, name: str | None) -> ModelSlot:
        """The slot `name` (a served name or alias, or a LoRA adapter's name: its base model;
        none: the default) routes to; 404 if none."""
        if not name:
            return self.default
        slot = self._by_name.get(name) or self.adapters.get(name)
        if slot is None:
            served = ", ".join(f"`{n}`" for n in [*(s.name for s in self.slots),
                                                  *self.adapters])
            raise APIError(HTTPStatus.NOT_FOUND, f"The model `{name}` does not exist; this "
                           f"server serves {served}.", param="model", code="model_not_found")
        return slot

    @asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[ServingContext]:
        """The serving context of `name`'s model (or adapter), loaded (on demand) and held
        busy meanwhile."""
        slot = self.resolve(name)
        adapter = name if name in slot.adapters else None
        slot.leases += 1
        if adapter is not None:
            slot.adapter_leases[adapter] += 1
        try:
            await self._ensure_loaded(slot, wait=not self.single)
            yield slot.ctx if adapter is None else slot.adapters[adapter]
        finally:
            slot.leases -= 1
            if adapter is not None:
                slot.adapter_leases[adapter] -= 1
            slot.last_used = self._clock()

    async def _ensure_loaded(self, slot: ModelSlot, wait: bool) -> None:
        while True:
            state = slot.state
            if state == "loaded":
                return
            if state == "failed" or (state == "loading" and not wait):
                slot.ctx.ready()  # the 503 that says why
                return
            if state == "loading":
                assert slot.loading is not None
                await asyncio.shield(slot.loading)
                continue
            async with self._lock:
                if slot.engine is None:
                    await self._unload_all(self._victims(slot))
                    logger.info("loading %s", slot.name)
                    slot.start(self._clock)

    # --- room ----------------------------------------------------------------------------------
    def _resident(self, but: ModelSlot) -> list[ModelSlot]:
        return [s for s in self.slots if s is not but and s.state in ("loaded", "loading")]

    def _fits(self, target: ModelSlot, resident: list[ModelSlot]) -> bool:
        cap, budget = self.args.max_loaded_models, self.args.memory_budget
        if cap is not None and len(resident) + 1 > cap:
            return False
        return budget is None or (sum(s.entry.memory_bytes for s in resident)
                                  + target.entry.memory_bytes <= budget)

    def _victims(self, target: ModelSlot) -> list[ModelSlot]:
        """The least recently used idle, unpinned models whose unloading makes room for
        `target`; 503 with Retry-After when even all of them would not."""
        resident = self._resident(target)
        now = self._clock()
        for slot in resident:
            if slot.busy:  # recency counts to the end of its last stream, not its route
                slot.last_used = now
        idle = sorted((s for s in resident if s.state == "loaded" and not s.entry.pinned
                       and not s.busy), key=lambda s: s.last_used)
        victims: list[ModelSlot] = []
        while not self._fits(target, [s for s in resident if s not in victims]):
            if not idle:
                busy = ", ".join(s.name for s in resident if s not in victims)
                raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, f"no room to load "
                               f"{target.name}: the loaded models ({busy}) are busy or "
                               "pinned (--max-loaded-models / --memory-budget); retry later",
                               code="model_capacity",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            victims.append(idle.pop(0))
        return victims

    async def _unload_all(self, slots: list[ModelSlot]) -> None:
        """Unload `slots` (under the lock): all read as unloaded before the first wait."""
        detached = [(s, s.detach()) for s in slots]
        while detached:
            slot, engine = detached.pop(0)
            began = time.perf_counter()
            await asyncio.to_thread(engine.shutdown)
            del engine
            await asyncio.to_thread(gc.collect)  # the weights go now, not at some later GC
            slot.unload_seconds = time.perf_counter() - began
            logger.info("unloaded %s in %.2fs", slot.name, slot.unload_seconds)

    # --- LoRA adapters --------------------------------------------------------------------------
    def add_adapter(self, request: LoRARequest, base: str | None = None) -> ModelSlot:
        """Serve an adapter as a model named after it, on model `base` (default: the default
        model); its files are checked now (ValueError), its fit to the model on first use."""
        slot = self._adapter_base(request.lora_name, base)
        LoRAAdapter.load(request.lora_name, request.lora_path, slot.entry.config.max_lora_rank)
        slot.add_adapter(request, self.args)
        self.adapters[request.lora_name] = slot
        return slot

    def _adapter_base(self, name: str, base: str | None) -> ModelSlot:
        if name in self._by_name or name in self.adapters:
            raise InvalidAdapterError(f"a model or LoRA adapter named {name!r} is already "
                                      "served")
        slot = self.resolve(base)
        if not slot.entry.config.enable_lora:
            raise InvalidAdapterError(f"{slot.name} serves no LoRA adapters: start it with "
                                      "--enable-lora")
        return slot

    async def load_adapter(self, request: LoRARequest, base: str | None = None) -> ModelSlot:
        """POST /v1/load_lora_adapter: serve an adapter from now on; 400 in OpenAI's shape
        when it cannot be (name taken, bad path or config, rank over --max-lora-rank, or
        the base model's shapes when it is loaded)."""
        async with self._adapter_lock:
            try:
                slot = self._adapter_base(request.lora_name, base)
                if slot.state == "loaded":  # the engine reads it and checks it fits
                    assert slot.engine is not None
                    await slot.engine.call(lambda e: e.add_lora(request))
                else:
                    await asyncio.to_thread(LoRAAdapter.load, request.lora_name,
                                            request.lora_path, slot.entry.config.max_lora_rank)
            except (InvalidAdapterError, ValueError) as e:
                raise APIError(HTTPStatus.BAD_REQUEST, str(e), param="lora_path",
                               code="invalid_lora_adapter") from None
            slot.add_adapter(request, self.args)
            self.adapters[request.lora_name] = slot
            logger.info("serving LoRA adapter %s on %s", request.lora_name, slot.name)
            return slot

    async def unload_adapter(self, name: str) -> None:
        """POST /v1/unload_lora_adapter: stop serving an adapter; 404 if it is not served,
        409 while it has requests."""
        async with self._adapter_lock:
            slot = self.adapters.get(name)
            if slot is None:
                raise APIError(HTTPStatus.NOT_FOUND, f"The LoRA adapter `{name}` is not loaded.",
                               param="lora_name", code="lora_adapter_not_found")
            busy = APIError(HTTPStatus.CONFLICT, f"The LoRA adapter `{name}` has requests in "
                            "flight; retry when they are done.", code="lora_adapter_busy",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
            if slot.adapter_leases[name]:
                raise busy
            if slot.state == "loaded":
                assert slot.engine is not None
                try:
                    await slot.engine.call(lambda e: e.remove_lora(name))
                except AdapterNotFoundError:
                    pass  # not used since the model (re)loaded: nothing to free
                except AdapterBusyError:
                    raise busy from None
            slot.remove_adapter(name)
            del self.adapters[name]
            logger.info("stopped serving LoRA adapter %s", name)

    # --- admin and keep-alive ------------------------------------------------------------------
    async def load(self, name: str) -> ModelSlot:
        """Load `name`'s model (making room as a request would) and wait for it; a failed
        model is tried again."""
        slot = self.resolve(name)
        if slot.state == "failed":
            async with self._lock:
                if slot.state == "failed":
                    await self._unload_all([slot])
        slot.leases += 1
        try:
            await self._ensure_loaded(slot, wait=True)
        finally:
            slot.leases -= 1
            slot.last_used = self._clock()
        return slot

    async def unload(self, name: str) -> ModelSlot:
        """Unload `name`'s model now, pinned or not; 409 while it is busy or loading."""
        slot = self.resolve(name)
        async with self._lock:
            if slot.engine is None:
                return slot
            if slot.busy or slot.state == "loading":
                raise APIError(HTTPStatus.CONFLICT, f"{slot.name} is busy (live requests or "
                               "loading); retry when it is idle", code="model_busy",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            await self._unload_all([slot])
        return slot

    async def unload_idle(self) -> list[str]:
        """Unload the unpinned models idle for --keep-alive seconds; their names."""
        keep = self.args.keep_alive
        if self.single or keep <= 0:
            return []
        async with self._lock:
            now = self._clock()
            expired = []
            for slot in self.slots:
                if slot.state != "loaded" or slot.entry.pinned:
                    continue
                if slot.busy:  # idleness counts from the end of its last request
                    slot.last_used = now
                elif now - slot.last_used >= keep:
                    expired.append(slot)
            await self._unload_all(expired)
        return [s.name for s in expired]

    async def _sweep(self) -> None:
        interval = min(1.0, self.args.keep_alive / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.unload_idle()
            except Exception:  # noqa: BLE001 - the sweeper must outlive one failure
                logger.exception("unloading idle models failed")

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start loading the preloaded models, and the keep-alive sweeper (on the loop)."""
        for slot in self.preload:
            slot.start(self._clock)
        if not self.single and self.args.keep_alive > 0:
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def shutdown(self) -> None:
        """Stop the sweeper and every engine."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        engines = [s.engine for s in self.slots if s.engine is not None]
        await asyncio.gather(*(asyncio.to_thread(e.shutdown) for e in engines))

    def abort_all(self) -> None:
        """Abort every live request of every model (from any thread)."""
        for slot in self.slots:
            engine = slot.engine
            if engine is not None:
                engine.abort_all()
