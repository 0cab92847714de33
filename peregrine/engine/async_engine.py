"""AsyncLLMEngine: the LLMEngine in a background thread, driven from asyncio.

The engine thread owns the LLMEngine: it loads the model, then loops `step()` while there
is work and sleeps when there is none. Other threads never touch the engine; they send
commands (add, abort, call) through a thread-safe queue that the thread drains between
steps, and get RequestOutputs back on per-request asyncio queues
(`loop.call_soon_threadsafe`). So a step never blocks the event loop, and the event loop
never races the engine's bookkeeping."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from peregrine.config import EngineConfig
from peregrine.engine.llm_engine import EngineStats, LLMEngine, PromptType, StepFailedError
from peregrine.layers.pooling import PoolingType
from peregrine.lora.request import LoRARequest
from peregrine.models.tokenizer import Tokenizer
from peregrine.outputs import RequestOutput
from peregrine.sampling_params import SamplingParams

logger = logging.getLogger("peregrine")

T = TypeVar("T")

# How long the loop sleeps when requests exist but a step did no work (dynamic batching
# waiting for its batch to fill), instead of spinning.
_IDLE_STEP_WAIT_S = 0.002


class EngineNotReadyError(RuntimeError):
    """The model is still loading (or failed to load, or the engine is shutting down)."""


class RequestFailedError(RuntimeError):
    """The engine failed while running this request; the request was aborted."""


class EngineObserver(Protocol):
    """Receives what the engine thread sees, for metrics (called on the engine thread)."""

    def on_outputs(self, outputs: list[RequestOutput]) -> None: ...

    def on_failed(self, request_ids: list[str]) -> None: ...


class RequestStream:
    """The outputs of one request, in order, as an async iterator; ends after the final one."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.added: asyncio.Future[None] = loop.create_future()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Deliver an output or an error from any thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def resolve_added(self, error: BaseException | None) -> None:
        """Tell the waiting handler whether the engine accepted the request (any thread)."""
        def settle() -> None:
            if self.added.done():
                return
            if error is None:
                self.added.set_result(None)
            else:
                self.added.set_exception(error)
        self.loop.call_soon_threadsafe(settle)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


@dataclass
class _Add:
    stream: RequestStream
    prompt: PromptType
    params: SamplingParams
    priority: int
    arrival_time: float
    lora_request: LoRARequest | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    pass


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    done: Callable[[Any, BaseException | None], None]


@dataclass
class _Stop:
    pass


Command = _Add | _Abort | _AbortAll | _Call | _Stop


@dataclass
class _Counts:
    """Requests not yet running: queued to the engine thread, or waiting in the scheduler."""

    pending: int = 0
    waiting: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class AsyncLLMEngine:
    """Runs an LLMEngine on its own thread; coroutines add, stream and abort requests."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None,
                 engine_factory: Callable[[EngineConfig], LLMEngine] = LLMEngine,
                 step_turn: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        self.config = config
        self.observer = observer
        self._factory = engine_factory
        # Each step runs inside step_turn(): several engines' steps take turns through it
        # (engine/fair_share.py); one engine alone steps freely.
        self._step_turn = step_turn
        self.engine: LLMEngine | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._counts = _Counts()
        self._stats: EngineStats | None = None
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="peregrine-engine", daemon=True)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; it loads the model first (see `loaded`, `load_error`)."""
        self._thread.start()

    @property
    def is_ready(self) -> bool:
        """True once the model is loaded and the engine takes requests."""
        return self.engine is not None and self._accepting and self._thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> LLMEngine:
        """Block until the model is loaded; re-raise a load failure."""
        if not self.loaded.wait(timeout):
            raise TimeoutError(f"the model did not load within {timeout} s")
        if self.load_error is not None:
            raise self.load_error
        assert self.engine is not None
        return self.engine

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, abort those still live (freeing their blocks), join the thread."""
        self._accepting = False
        if self._thread.is_alive():
            self._send(_Stop())
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._fail_pending(EngineNotReadyError("the server is shutting down"))

    # --- the loaded model: read-only once loaded, so safe from the event loop ------------------
    def _loaded(self) -> LLMEngine:
        if self.engine is None:
            raise EngineNotReadyError("the model is still loading")
        return self.engine

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt + output) one sequence can hold: the context, or the KV pool."""
        return self._loaded().context_limit

    @property
    def hidden_size(self) -> int:
        """The width of the model's hidden states (its pooled embeddings' size)."""
        return self._loaded().model_config.hidden_size

    @property
    def model_path(self) -> str | None:
        """Where the loaded model came from (None until it is loaded)."""
        return None if self.engine is None else self.engine.loaded.source.path

    @property
    def load_time(self) -> float:
        """Seconds the model took to load."""
        return self._loaded().load_time

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, for cheap lookups (token texts); encode with `tokenize`."""
        return self._loaded().tokenizer

    async def tokenize(self, texts: list[str], add_special_tokens: bool = True,
                       limit: int | None = None) -> list[list[int]]:
        """The token ids of each text, encoded in a worker thread; PromptTooLongError as soon
        as one is sure to pass `limit` tokens."""
        tok = self.tokenizer
        if limit is None:
            return await asyncio.to_thread(
                lambda: [tok.encode(t, add_special_tokens) for t in texts])
        return await asyncio.to_thread(
            lambda: [tok.encode_within(t, limit, add_special_tokens) for t in texts])

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, decoded in a worker thread."""
        return await asyncio.to_thread(self.tokenizer.decode, token_ids)

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          limit: int | None = None, **template_kwargs: Any
                          ) -> tuple[str, list[int]]:
        """The chat template applied to `messages`, and its token ids (worker threads);
        PromptTooLongError as soon as they are sure to pass `limit` tokens."""
        tok = self.tokenizer
        text = await asyncio.to_thread(tok.apply_chat_template, messages, add_generation_prompt,
                                       **template_kwargs)
        if limit is None:
            return text, await asyncio.to_thread(tok.encode, text, False)
        return text, await asyncio.to_thread(tok.encode_within, text, limit, False)

    # --- requests -----------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          priority: int = 0, lora_request: LoRARequest | None = None
                          ) -> RequestStream:
        """Queue a request (with `lora_request`: on that adapter) and wait until the engine
        accepted it; ValueError if it did not."""
        if not self.is_ready:
            raise EngineNotReadyError("the model is still loading" if self._accepting
                                      else "the server is shutting down")
        stream = RequestStream(request_id, asyncio.get_running_loop())
        with self._counts.lock:
            self._counts.pending += 1
        self._send(_Add(stream, prompt, params, priority, time.monotonic(), lora_request))
        try:
            await stream.added
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its blocks are freed before the next step."""
        self._send(_Abort(request_id))

    def abort_all(self) -> None:
        """Abort every live request (from any thread); each stream ends with an "abort"."""
        self._send(_AbortAll())

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running (the queue that --max-queue-len bounds)."""
        with self._counts.lock:
            return self._counts.pending + self._counts.waiting

    @property
    def num_live(self) -> int:
        """Requests accepted and not yet finished (queued to the thread, waiting or running)."""
        with self._counts.lock:
            pending = self._counts.pending
        return pending + len(self._streams)  # len() of a dict is atomic; a snapshot suffices

    def stats(self) -> EngineStats | None:
        """The engine's stats after its latest step or command (None while loading)."""
        return self._stats

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between two steps and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
            loop.call_soon_threadsafe(settle)

        self._send(_Call(fn, done))
        return await future

    async def embed(self, token_ids: list[list[int]],
                    pooling: PoolingType | list[PoolingType] = "last") -> torch.Tensor:
        """Normalized pooled hidden states [N, hidden] of token-id sequences (LLMEngine.embed),
        computed on the engine thread between two steps."""
        if not self.is_ready:
            raise EngineNotReadyError("the model is still loading" if self._accepting
                                      else "the server is shutting down")
        return await self.call(lambda engine: engine.embed(token_ids, pooling))

    def _send(self, command: Command) -> None:
        self._commands.put(command)
        self._wake.set()

    # --- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory(self.config)
            self._stats = self.engine.get_stats()
        except BaseException as e:  # noqa: BLE001 - reported through load_error and the log
            logger.exception("the engine failed to load")
            self.load_error = e
            self._accepting = False
            self.loaded.set()
            self._fail_pending(EngineNotReadyError(f"the model failed to load: {e}"))
            return
        self.loaded.set()
        engine = self.engine
        while True:
            try:
                if not self._drain(engine):
                    break
                if engine.has_unfinished_requests():
                    steps = engine.num_steps
                    with self._step_turn():
                        self._step(engine)
                    if engine.num_steps == steps:
                        self._wake.wait(_IDLE_STEP_WAIT_S)
                        self._wake.clear()
                else:
                    self._wake.wait()
                    self._wake.clear()
            except Exception:  # noqa: BLE001 - the loop must not die silently
                logger.exception("the engine loop failed; failing every live request")
                self._fail_all(engine, "the engine loop failed")
        for request_id in list(self._streams):
            self._abort(engine, request_id)
        self._fail_pending(EngineNotReadyError("the server is shutting down"))
        self._publish(engine)
        engine.shutdown()  # worker processes of a parallel engine

    def _drain(self, engine: LLMEngine) -> bool:
        """Apply every queued command; False once a stop command arrived."""
        changed = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            changed = True
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Add):
                self._add(engine, command)
            elif isinstance(command, _Abort):
                self._abort(engine, command.request_id)
            elif isinstance(command, _AbortAll):
                for request_id in list(self._streams):
                    self._abort(engine, request_id)
            else:
                try:
                    command.done(command.fn(engine), None)
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    command.done(None, e)
        if changed:
            self._publish(engine)
        return True

    def _add(self, engine: LLMEngine, command: _Add) -> None:
        stream = command.stream
        with self._counts.lock:
            self._counts.pending -= 1
        try:
            engine.add_request(stream.request_id, command.prompt, command.params,
                               priority=command.priority, arrival_time=command.arrival_time,
                               lora_request=command.lora_request)
        except Exception as e:  # noqa: BLE001 - bad requests go back to their handler
            stream.resolve_added(e)
            return
        self._streams[stream.request_id] = stream
        stream.resolve_added(None)

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        req = engine.requests.get(request_id)
        engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if req is None:
            return
        req.times.finished = time.monotonic()
        out = engine.make_output(req)
        self._publish(engine)  # stats first: whoever sees the output sees the freed blocks
        if stream is not None:
            stream.put(out)
        if self.observer is not None:
            self.observer.on_outputs([out])

    def _step(self, engine: LLMEngine) -> None:
        try:
            outputs = engine.step()
        except StepFailedError as e:
            logger.error("engine step failed; aborting %s", e.request_ids, exc_info=e.__cause__)
            error = RequestFailedError(f"the engine failed while running this request: "
                                       f"{type(e.__cause__).__name__}: {e.__cause__}")
            self._publish(engine)
            for request_id in e.request_ids:
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream.put(error)
            if self.observer is not None:
                self.observer.on_failed(e.request_ids)
            return
        except Exception:  # noqa: BLE001 - a failure outside the model run: fail everything live
            logger.exception("engine step failed outside the model run; aborting all requests")
            self._fail_all(engine, "the engine failed while scheduling")
            return
        self._publish(engine)  # stats first: whoever sees an output sees the step's effects
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                if out.finished:
                    del self._streams[out.request_id]
                stream.put(out)
        if self.observer is not None and outputs:
            self.observer.on_outputs(outputs)

    def _fail_all(self, engine: LLMEngine, message: str) -> None:
        """Abort every live request and fail its stream (its blocks are freed)."""
        failed = list(dict.fromkeys([*engine.requests, *self._streams]))
        for request_id in failed:
            engine.abort_request(request_id)
        self._publish(engine)
        for request_id in failed:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(RequestFailedError(message))
        if self.observer is not None:
            self.observer.on_failed(failed)

    def _publish(self, engine: LLMEngine) -> None:
        stats = engine.get_stats()
        self._stats = stats
        # Requests, not sequences: the n samples of one request wait together.
        waiting = len({seq.request.request_id for seq in engine.scheduler.waiting})
        with self._counts.lock:
            self._counts.waiting = waiting

    def _fail_pending(self, error: BaseException) -> None:
        """Refuse the adds still queued (load failure or shutdown)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                with self._counts.lock:
                    self._counts.pending -= 1
                command.stream.resolve_added(error)
            elif isinstance(command, _Call):
                command.done(None, error)
