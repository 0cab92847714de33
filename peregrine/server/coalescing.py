"""Request coalescing: identical deterministic requests in flight share one engine request.

A request whose output is fixed by its prompt and SamplingParams (greedy, beam search, or
an explicit seed) that arrives while an identical one is waiting or running does not add
a second engine request: it is attached to the one in flight and gets every output of it
under its own request_id, the latest cumulative one first if it came late. Each client
detaches on its own; the engine request is aborted only when every attached client is
gone. Sampled requests without a seed never coalesce: their outputs must differ.

The layer wraps AsyncLLMEngine through its public API (add_request, abort, the streams),
so it lives beside the server and never inside the engine's step loop."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from peregrine.engine.async_engine import AsyncLLMEngine, RequestStream
from peregrine.engine.llm_engine import PromptType
from peregrine.lora.request import LoRARequest
from peregrine.outputs import CompletionOutput, RequestOutput
from peregrine.sampling_params import SamplingParams
from peregrine.structured.grammar import StructuredOutputs


class CoalescingObserver(Protocol):
    """Receives what the coalescer saves, for metrics (called on the event loop)."""

    def on_coalesced(self) -> None: ...

    def on_tokens_saved(self, tokens: int) -> None: ...


def is_deterministic(params: SamplingParams) -> bool:
    """True when the prompt and params alone fix the output: greedy, beam search or a seed."""
    return params.greedy or params.use_beam_search or params.seed is not None


def coalescing_key(prompt: PromptType, params: SamplingParams) -> Hashable | None:
    """What must be equal for two requests to share an output (every SamplingParams field
    and the prompt; priority only orders the queue); None when they must not share one."""
    if not is_deterministic(params):
        return None
    return _freeze(prompt), tuple((f.name, _freeze(getattr(params, f.name)))
                                  for f in dataclasses.fields(params))


def _freeze(value: Any) -> Hashable:
    """A hashable value equal exactly when `value`s are equal."""
    if isinstance(value, StructuredOutputs):
        return ("structured", value.key())
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((_freeze(k), _freeze(v)) for k, v in value.items()),
                                     key=repr)))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("repr", type(value).__name__, repr(value))
    return value


def _num_tokens(out: RequestOutput) -> int:
    return sum(len(o.token_ids) for o in out.outputs)


@dataclass
class _Client:
    """One attached request: its stream, and how many generated tokens it was given."""

    stream: RequestStream
    delivered: int = 0


@dataclass
class _Group:
    """One engine request and the clients attached to it."""

    engine_id: str
    key: Hashable | None
    prompt: PromptType
    params: SamplingParams
    accepted: asyncio.Future[None]
    clients: dict[str, _Client] = field(default_factory=dict)
    latest: RequestOutput | None = None
    delivered_detached: int = 0  # tokens given to clients that left before the end
    abort_requested: bool = False
    task: asyncio.Task[None] | None = None


class RequestCoalescer:
    """AsyncLLMEngine's add_request and abort, with identical deterministic requests sharing
    one engine request; `enabled=False` passes every call straight to the engine."""

    def __init__(self, engine: AsyncLLMEngine, observer: CoalescingObserver | None = None,
                 enabled: bool = True, lora_request: LoRARequest | None = None) -> None:
        self.engine = engine
        self.lora_request = lora_request  # every request added runs on this adapter
        self.observer = observer
        self.enabled = enabled
        self._in_flight: dict[Hashable, _Group] = {}
        self._by_client: dict[str, _Group] = {}

    @property
    def num_clients(self) -> int:
        """Requests attached now (each engine request counts once per attached client)."""
        return len(self._by_client)

    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          priority: int = 0) -> RequestStream:
        """Like AsyncLLMEngine.add_request; an identical deterministic request in flight is
        joined instead of starting a new engine request."""
        if not self.enabled:
            return await self.engine.add_request(request_id, prompt, params, priority,
                                                 lora_request=self.lora_request)
        if request_id in self._by_client:
            raise ValueError(f"request id {request_id!r} is already in flight")
        key = coalescing_key(prompt, params)
        group = self._in_flight.get(key) if key is not None else None
        joined = group is not None
        if group is None:
            loop = asyncio.get_running_loop()
            group = _Group(request_id, key, prompt, params, loop.create_future())
            if key is not None:
                self._in_flight[key] = group
            group.task = asyncio.ensure_future(self._drive(group, priority))
        stream = RequestStream(request_id, asyncio.get_running_loop())
        stream.added.set_result(None)
        client = _Client(stream)
        group.clients[request_id] = client
        self._by_client[request_id] = group
        if group.latest is not None:  # a late joiner starts from the text so far
            self._deliver(request_id, client, group.latest)
        try:
            await asyncio.shield(group.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._by_client.pop(request_id, None)
            raise
        if joined and self.observer is not None:
            self.observer.on_coalesced()
        return stream

    def abort(self, request_id: str) -> None:
        """Detach a request; its engine request is aborted once no client is attached.
        Call it on the event loop; unknown or finished requests are ignored."""
        if not self.enabled:
            self.engine.abort(request_id)
            return
        group = self._by_client.get(request_id)
        if group is None:
            return
        if len(group.clients) > 1:
            self._by_client.pop(request_id)
            client = group.clients.pop(request_id)
            group.delivered_detached += client.delivered
            client.stream.queue.put_nowait(self._aborted(request_id, group))
            return
        # The last client stays attached to get the engine's own final ("abort") output.
        self._forget(group)
        if not group.abort_requested:
            group.abort_requested = True
            if group.accepted.done():
                self.engine.abort(group.engine_id)
            # else: _drive aborts right after the engine accepts, so the abort follows the add

    async def _drive(self, group: _Group, priority: int) -> None:
        """Add the engine request, then fan its outputs out to the attached clients."""
        try:
            stream = await self.engine.add_request(group.engine_id, group.prompt, group.params,
                                                   priority, lora_request=self.lora_request)
        except BaseException as e:
            self._forget(group)
            for request_id in group.clients:
                self._by_client.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError):
                group.accepted.cancel()
            elif not group.accepted.done():
                group.accepted.set_exception(e)
                group.accepted.exception()  # retrieved: no client may be left to await it
            if not isinstance(e, Exception):
                raise
            return
        group.accepted.set_result(None)
        if group.abort_requested:
            self.engine.abort(group.engine_id)
        try:
            async for out in stream:
                group.latest = out
                for request_id, client in list(group.clients.items()):
                    self._deliver(request_id, client, out)
        except Exception as e:  # noqa: BLE001 - every client gets the engine's error
            for client in group.clients.values():
                client.stream.queue.put_nowait(e)
        finally:
            self._forget(group)
            for request_id in group.clients:
                self._by_client.pop(request_id, None)
            self._count_saved(group)

    def _deliver(self, request_id: str, client: _Client, out: RequestOutput) -> None:
        if out.request_id != request_id:
            out = dataclasses.replace(out, request_id=request_id)
        client.delivered = _num_tokens(out)
        client.stream.queue.put_nowait(out)

    def _forget(self, group: _Group) -> None:
        """Stop new requests from joining `group`."""
        if group.key is not None and self._in_flight.get(group.key) is group:
            del self._in_flight[group.key]

    def _count_saved(self, group: _Group) -> None:
        """Tokens handed to clients beyond those the engine generated once."""
        if self.observer is None or group.latest is None:
            return
        delivered = group.delivered_detached + sum(c.delivered for c in group.clients.values())
        saved = delivered - _num_tokens(group.latest)
        if saved > 0:
            self.observer.on_tokens_saved(saved)

    @staticmethod
    def _aborted(request_id: str, group: _Group) -> RequestOutput:
        """The final output a detached client's stream ends with, as an engine abort's."""
        if group.latest is None:
            outs = [CompletionOutput(i, "", [], finish_reason="abort")
                    for i in range(group.params.n)]
            p = group.prompt
            text, ids = ((p.get("prompt"), p.get("prompt_token_ids")) if isinstance(p, dict)
                         else (p, None) if isinstance(p, str) else (None, p))
            return RequestOutput(request_id, text, list(ids or []), outs, True)
        outs = [o if o.finished else dataclasses.replace(o, finish_reason="abort")
                for o in group.latest.outputs]
        return dataclasses.replace(group.latest, request_id=request_id, outputs=outs,
                                   finished=True)
