"""The request coalescer on its own, over a fake engine whose outputs the test hands out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from peregrine.cli import build_parser
from peregrine.engine.async_engine import RequestFailedError, RequestStream
from peregrine.outputs import CompletionOutput, RequestOutput
from peregrine.sampling_params import SamplingParams
from peregrine.server.args import ServerArgs
from peregrine.server.coalescing import RequestCoalescer, coalescing_key
from peregrine.structured.grammar import StructuredOutputs

PROMPT = {"prompt": "hi", "prompt_token_ids": [1, 2, 3]}
GREEDY = SamplingParams(temperature=0, max_tokens=8)


class FakeEngine:
    """Records adds and aborts; `emit` sends a request's cumulative output."""

    def __init__(self) -> None:
        self.streams: dict[str, RequestStream] = {}
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.log: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None  # set: adds wait for it
        self.refuse: Exception | None = None
        self.tokens: dict[str, list[int]] = {}

    async def add_request(self, request_id: str, prompt: Any, params: SamplingParams,
                          priority: int = 0, lora_request: Any = None) -> RequestStream:
        self.log.append(("add", request_id))
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse is not None:
            raise self.refuse
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self.streams[request_id] = stream
        self.added.append(request_id)
        self.tokens[request_id] = []
        return stream

    def abort(self, request_id: str) -> None:
        self.log.append(("abort", request_id))
        self.aborted.append(request_id)
        if request_id in self.streams:
            self.emit(request_id, 0, "abort")

    def emit(self, request_id: str, new_tokens: int, finish: str | None = None) -> None:
        ids = self.tokens[request_id]
        ids.extend(range(len(ids), len(ids) + new_tokens))
        out = RequestOutput(request_id, "hi", [1, 2, 3], [CompletionOutput(
            0, "".join(f"t{i} " for i in ids), list(ids), finish_reason=finish)],
            finished=finish is not None)
        stream = self.streams[request_id] if finish is None else self.streams.pop(request_id)
        stream.queue.put_nowait(out)


class Counts:
    """A CoalescingObserver that counts."""

    def __init__(self) -> None:
        self.coalesced = 0
        self.saved = 0

    def on_coalesced(self) -> None:
        self.coalesced += 1

    def on_tokens_saved(self, tokens: int) -> None:
        self.saved += tokens


def run(test: Callable[[RequestCoalescer, FakeEngine, Counts], Awaitable[None]],
        enabled: bool = True) -> None:
    engine, counts = FakeEngine(), Counts()

    async def main() -> None:
        await test(RequestCoalescer(engine, counts, enabled), engine, counts)  # type: ignore[arg-type]
    asyncio.run(asyncio.wait_for(main(), 10))


async def drain(stream: RequestStream) -> list[RequestOutput]:
    return [out async for out in stream]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# --- the key ------------------------------------------------------------------------------------
def test_only_deterministic_requests_have_a_key():
    assert coalescing_key(PROMPT, SamplingParams(temperature=0)) is not None
    assert coalescing_key(PROMPT, SamplingParams(temperature=0.8, seed=3)) is not None
    assert coalescing_key(PROMPT, SamplingParams(use_beam_search=True, n=2)) is not None
    assert coalescing_key(PROMPT, SamplingParams(temperature=0.8)) is None
    assert coalescing_key(PROMPT, SamplingParams(temperature=1.0, top_k=5)) is None


def test_equal_prompts_and_params_give_one_key():
    def params() -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=9, stop=["x"], logit_bias={"5": 1.0},
                              logprobs=2, structured={"json": {"type": "object"}})
    assert coalescing_key(dict(PROMPT), params()) == coalescing_key(dict(PROMPT), params())
    hash(coalescing_key(PROMPT, params()))


@pytest.mark.parametrize("change", [
    dict(max_tokens=9), dict(stop=["."]), dict(logprobs=1), dict(n=2), dict(seed=1),
    dict(logit_bias={5: 2.0}), dict(structured=StructuredOutputs(regex="a+")),
    dict(min_tokens=2), dict(ignore_eos=True), dict(stop_token_ids=[7]),
    dict(prompt_logprobs=0), dict(skip_special_tokens=False), dict(repetition_penalty=1.1)])
def test_any_params_difference_changes_the_key(change):
    base = coalescing_key(PROMPT, GREEDY)
    assert coalescing_key(PROMPT, SamplingParams(**{"temperature": 0, "max_tokens": 8,
                                                    **change})) != base


def test_any_prompt_difference_changes_the_key():
    base = coalescing_key(PROMPT, GREEDY)
    assert coalescing_key({**PROMPT, "prompt_token_ids": [1, 2, 4]}, GREEDY) != base
    assert coalescing_key({**PROMPT, "prompt": "hi!"}, GREEDY) != base
    assert coalescing_key("hi", GREEDY) != base


# --- sharing --------------------------------------------------------------------------------------
def test_identical_requests_share_one_engine_request():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        a = await c.add_request("a", PROMPT, GREEDY)
        b = await c.add_request("b", PROMPT, GREEDY, priority=5)  # priority does not matter
        assert engine.added == ["a"] and counts.coalesced == 1
        engine.emit("a", 2)
        engine.emit("a", 2, "length")
        outs_a, outs_b = await drain(a), await drain(b)
        assert [o.request_id for o in outs_a] == ["a", "a"]
        assert [o.request_id for o in outs_b] == ["b", "b"]
        assert [o.outputs[0].text for o in outs_a] == [o.outputs[0].text for o in outs_b]
        assert outs_b[-1].outputs[0].token_ids == [0, 1, 2, 3] and b.finished
        assert counts.saved == 4 and c.num_clients == 0 and engine.aborted == []
    run(test)


def test_a_late_joiner_gets_the_text_so_far_first():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        a = await c.add_request("a", PROMPT, GREEDY)
        engine.emit("a", 3)
        await settle()
        b = await c.add_request("b", PROMPT, GREEDY)
        engine.emit("a", 1, "stop")
        outs_b = await drain(b)
        assert [o.outputs[0].token_ids for o in outs_b] == [[0, 1, 2], [0, 1, 2, 3]]
        assert outs_b[-1].outputs[0].text == "t0 t1 t2 t3 "
        assert len(await drain(a)) == 2 and counts.saved == 4
    run(test)


def test_requests_that_may_differ_run_on_their_own():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        sampled = SamplingParams(temperature=0.7, max_tokens=8)
        await c.add_request("a", PROMPT, sampled)
        await c.add_request("b", PROMPT, sampled)
        await c.add_request("c", PROMPT, GREEDY)
        await c.add_request("d", PROMPT, SamplingParams(temperature=0, max_tokens=7))
        assert engine.added == ["a", "b", "c", "d"] and counts.coalesced == 0
    run(test)


def test_a_finished_request_is_not_joined():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        a = await c.add_request("a", PROMPT, GREEDY)
        engine.emit("a", 2, "length")
        await drain(a)
        await c.add_request("b", PROMPT, GREEDY)
        assert engine.added == ["a", "b"] and counts.coalesced == 0
    run(test)


def test_requests_joining_while_the_engine_has_not_accepted_share_it():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        engine.gate = asyncio.Event()
        adds = [asyncio.ensure_future(c.add_request(r, PROMPT, GREEDY)) for r in "abc"]
        await settle()
        assert c.num_clients == 3 and not any(t.done() for t in adds)
        engine.gate.set()
        streams = await asyncio.gather(*adds)
        engine.emit("a", 1, "stop")
        assert [len(await drain(s)) for s in streams] == [1, 1, 1]
        assert engine.added == ["a"] and counts.coalesced == 2 and counts.saved == 2
    run(test)


# --- leaving ------------------------------------------------------------------------------------
def test_a_leaving_first_client_does_not_stop_the_others():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        a = await c.add_request("a", PROMPT, GREEDY)
        b = await c.add_request("b", PROMPT, GREEDY)
        engine.emit("a", 2)
        await settle()
        c.abort("a")
        c.abort("a")  # a second abort (collect, then the response) changes nothing
        assert engine.aborted == []
        outs_a = await drain(a)
        assert outs_a[-1].finished and outs_a[-1].outputs[0].finish_reason == "abort"
        assert outs_a[-1].request_id == "a"
        engine.emit("a", 2, "length")
        outs_b = await drain(b)
        assert outs_b[-1].outputs[0].finish_reason == "length"
        assert outs_b[-1].outputs[0].token_ids == [0, 1, 2, 3]
        assert engine.aborted == [] and c.num_clients == 0
        assert counts.saved == 2  # a got 2 tokens, b 4; the engine made 4
    run(test)


def test_the_engine_request_is_aborted_when_every_client_left():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        a = await c.add_request("a", PROMPT, GREEDY)
        b = await c.add_request("b", PROMPT, GREEDY)
        engine.emit("a", 1)
        await settle()
        c.abort("b")
        assert engine.aborted == []
        c.abort("a")
        assert engine.aborted == ["a"]
        outs_a = await drain(a)
        assert outs_a[-1].outputs[0].finish_reason == "abort"
        assert (await drain(b))[-1].outputs[0].finish_reason == "abort"
        # A newcomer does not join an aborted request: it starts its own.
        await c.add_request("c", PROMPT, GREEDY)
        assert engine.added == ["a", "c"] and c.num_clients == 1
    run(test)


def test_leaving_before_the_engine_accepted_aborts_after_the_add():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        engine.gate = asyncio.Event()
        add = asyncio.ensure_future(c.add_request("a", PROMPT, GREEDY))
        await settle()
        add.cancel()
        with pytest.raises(asyncio.CancelledError):
            await add
        assert engine.aborted == []
        engine.gate.set()
        await settle()
        assert engine.log == [("add", "a"), ("abort", "a")]
        await settle()
        assert c.num_clients == 0 and engine.streams == {}
    run(test)


def test_a_cancelled_joiner_only_detaches():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        engine.gate = asyncio.Event()
        first = asyncio.ensure_future(c.add_request("a", PROMPT, GREEDY))
        second = asyncio.ensure_future(c.add_request("b", PROMPT, GREEDY))
        await settle()
        second.cancel()
        engine.gate.set()
        a = await first
        engine.emit("a", 2, "length")
        assert (await drain(a))[-1].outputs[0].finish_reason == "length"
        assert engine.aborted == [] and counts.coalesced == 0
    run(test)


# --- failures -----------------------------------------------------------------------------------
def test_a_refused_request_fails_every_client():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        engine.gate, engine.refuse = asyncio.Event(), ValueError("bad constraint")
        adds = [asyncio.ensure_future(c.add_request(r, PROMPT, GREEDY)) for r in "ab"]
        await settle()
        engine.gate.set()
        results = await asyncio.gather(*adds, return_exceptions=True)
        assert [str(r) for r in results] == ["bad constraint"] * 2
        assert c.num_clients == 0 and counts.coalesced == 0
        engine.gate, engine.refuse = None, None
        await c.add_request("c", PROMPT, GREEDY)
        assert engine.added == ["c"]
    run(test)


def test_an_engine_failure_reaches_every_client():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        a = await c.add_request("a", PROMPT, GREEDY)
        b = await c.add_request("b", PROMPT, GREEDY)
        engine.streams.pop("a").queue.put_nowait(RequestFailedError("boom"))
        for s in (a, b):
            with pytest.raises(RequestFailedError):
                await drain(s)
        assert c.num_clients == 0
    run(test)


def test_a_request_id_in_flight_is_refused():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        await c.add_request("a", PROMPT, GREEDY)
        with pytest.raises(ValueError, match="already in flight"):
            await c.add_request("a", PROMPT, GREEDY)
    run(test)


# --- off ----------------------------------------------------------------------------------------
def test_disabled_passes_everything_to_the_engine():
    async def test(c: RequestCoalescer, engine: FakeEngine, counts: Counts) -> None:
        a = await c.add_request("a", PROMPT, GREEDY)
        await c.add_request("b", PROMPT, GREEDY)
        assert engine.added == ["a", "b"] and a is engine.streams["a"]
        c.abort("a")
        assert engine.aborted == ["a"] and counts.coalesced == 0
    run(test, enabled=False)


def test_the_flag():
    assert ServerArgs().request_coalescing is True
    for argv, on in [(["serve"], True), (["serve", "--no-request-coalescing"], False)]:
        ns = build_parser().parse_args(argv)
        assert ServerArgs.from_namespace(ns).request_coalescing is on
