"""Request coalescing on a live server: identical deterministic requests in flight share one
engine request and all get its whole text, streamed or not; sampled ones without a seed and
ones that differ in any parameter run on their own; a client that leaves only detaches, and
the engine request is aborted (its KV blocks freed) when the last one leaves.

The engine thread is held while the requests arrive, so they are all in flight together
however slow the machine is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from peregrine.config import EngineConfig
from peregrine.server.app import ServerArgs
from tests.server.conftest import SMALL_KV, RunningServer, serve

COALESCED = "peregrine:coalesced_requests_total"
SAVED = "peregrine:coalesced_tokens_saved_total"
GENERATED = "peregrine:generation_tokens_total"
ABORTED = 'peregrine:request_success_total{finished_reason="abort"}'
LENGTH = 'peregrine:request_success_total{finished_reason="length"}'


@pytest.fixture(scope="module")
def plain_server() -> Iterator[RunningServer]:
    """A server with --no-request-coalescing."""
    with serve(ServerArgs(max_queue_len=64, request_coalescing=False),
               EngineConfig(**SMALL_KV)) as s:
        yield s


def _chat(max_tokens: int, **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": "Write a poem about the sea."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


def _delta(server: RunningServer, before: dict[str, float], name: str) -> float:
    return server.metrics().get(name, 0.0) - before.get(name, 0.0)


@contextlib.asynccontextmanager
async def _engine_held(server: RunningServer) -> AsyncIterator[None]:
    """Hold the engine thread (so added requests stay in flight) until the block ends."""
    entered, release = threading.Event(), threading.Event()

    def hold(engine: Any) -> None:
        entered.set()
        release.wait(120)

    thread = threading.Thread(target=lambda: asyncio.run(server.engine.call(hold)))
    thread.start()
    assert await asyncio.to_thread(entered.wait, 60)
    try:
        yield
    finally:
        release.set()
        await asyncio.to_thread(thread.join, 60)


async def _attached(server: RunningServer, count: int) -> None:
    """Wait until `count` requests are attached to the coalescer."""
    requests = server.app.state.peregrine.ctx.requests
    for _ in range(1200):
        if requests.num_clients >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{requests.num_clients} requests attached, expected {count}")


async def _post(c: httpx.AsyncClient, path: str, body: dict) -> str:
    r = await c.post(path, json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    if path.endswith("/messages"):
        return "".join(b["text"] for b in data["content"])
    choice = data["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


async def _stream(c: httpx.AsyncClient, path: str, body: dict,
                  drop_after: int | None = None) -> dict:
    """One streamed request's text; closes the connection after `drop_after` text pieces."""
    text, pieces, done = "", 0, False
    async with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("type") == "message_stop":
                done = True
                break
            piece = ""
            if event.get("type") == "content_block_delta":
                piece = event["delta"].get("text", "")
            for choice in event.get("choices", []):
                piece += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            text += piece
            pieces += bool(piece)
            if drop_after is not None and pieces >= drop_after:
                break  # leaving the block closes the connection mid-stream
    return {"text": text, "done": done}


def _client(server: RunningServer, **timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(300, **timeout),
                             limits=limits)


def test_identical_greedy_chats_run_once_and_all_get_the_whole_text(server, plain_server):
    max_tokens = 24
    body = _chat(max_tokens)
    before = server.metrics()

    async def main() -> tuple[list[str], list[dict]]:
        async with _client(server) as c:
            async with _engine_held(server):
                posts = [asyncio.ensure_future(_post(c, "/v1/chat/completions", body))
                         for _ in range(3)]
                streams = [asyncio.ensure_future(_stream(c, "/v1/chat/completions", body))
                           for _ in range(3)]
                await _attached(server, 6)
            return await asyncio.gather(*posts), await asyncio.gather(*streams)

    texts, streamed = asyncio.run(main())
    assert texts[0] and len(set(texts)) == 1
    assert all(s["done"] and s["text"] == texts[0] for s in streamed)
    server.wait_idle()
    assert _delta(server, before, COALESCED) == 5
    assert _delta(server, before, GENERATED) == max_tokens  # one engine request made them
    assert _delta(server, before, LENGTH) == 1
    assert _delta(server, before, SAVED) == 5 * max_tokens
    # The same greedy text as the engine alone gives.
    alone = httpx.post(plain_server.api + "/chat/completions", json=body, timeout=300).json()
    assert alone["choices"][0]["message"]["content"] == texts[0]


def test_identical_completions_and_messages_coalesce(server):
    completion = {"prompt": "The sea is", "max_tokens": 12, "temperature": 0}
    message = {"model": "smollm2-135m", "max_tokens": 10, "temperature": 0,
               "messages": [{"role": "user", "content": "Name a colour."}]}
    before = server.metrics()

    async def main() -> list:
        async with _client(server) as c:
            async with _engine_held(server):
                tasks = [asyncio.ensure_future(t) for t in [
                    _post(c, "/v1/completions", completion),
                    _post(c, "/v1/completions", completion),
                    _stream(c, "/v1/completions", completion),
                    _post(c, "/v1/messages", message), _stream(c, "/v1/messages", message)]]
                await _attached(server, 5)
            return await asyncio.gather(*tasks)

    a, b, s, m, ms = asyncio.run(main())
    assert a and a == b == s["text"] and s["done"]
    assert m and m == ms["text"] and ms["done"]
    server.wait_idle()
    assert _delta(server, before, COALESCED) == 3  # two engine requests for five clients


def test_sampled_requests_coalesce_only_with_a_seed(server):
    max_tokens = 8
    sampled = _chat(max_tokens, temperature=1.0)
    seeded = _chat(max_tokens, temperature=1.0, seed=7)
    before = server.metrics()

    async def main() -> tuple[list[str], list[str]]:
        async with _client(server) as c:
            async with _engine_held(server):
                free = [asyncio.ensure_future(_post(c, "/v1/chat/completions", sampled))
                        for _ in range(3)]
                fixed = [asyncio.ensure_future(_post(c, "/v1/chat/completions", seeded))
                         for _ in range(3)]
                await _attached(server, 6)
            return await asyncio.gather(*free), await asyncio.gather(*fixed)

    free, fixed = asyncio.run(main())
    assert len(set(fixed)) == 1
    server.wait_idle()
    assert _delta(server, before, COALESCED) == 2  # only the seeded ones
    assert _delta(server, before, GENERATED) == 4 * max_tokens  # 3 sampled + 1 seeded


def test_requests_that_differ_in_any_parameter_run_on_their_own(server):
    variants = [_chat(8), _chat(9), _chat(8, stop=["zzz"]), _chat(8, logprobs=True),
                _chat(8, seed=1), _chat(8, logit_bias={"11": 1}), _chat(8, n=2),
                _chat(8, response_format={"type": "json_object"}),
                {**_chat(8), "messages": [{"role": "user", "content": "Write a poem."}]}]
    before = server.metrics()

    async def main() -> list[str]:
        async with _client(server) as c:
            async with _engine_held(server):
                tasks = [asyncio.ensure_future(_post(c, "/v1/chat/completions", v))
                         for v in variants]
                await _attached(server, len(variants))
            return await asyncio.gather(*tasks)

    assert all(asyncio.run(main()))
    server.wait_idle()
    assert _delta(server, before, COALESCED) == 0
    ran = sum(_delta(server, before, f'peregrine:request_success_total{{finished_reason="{r}"}}')
              for r in ("length", "stop"))
    assert ran == len(variants)


def test_a_leaving_client_does_not_stop_the_others(server):
    max_tokens = 64
    body = _chat(max_tokens)
    before = server.metrics()

    async def main() -> tuple[dict, list[dict], str]:
        async with _client(server) as c:
            async with _engine_held(server):
                # The first one in is the request the engine runs; it leaves first.
                first = asyncio.ensure_future(_stream(c, "/v1/chat/completions", body, 2))
                await _attached(server, 1)
                dropped = asyncio.ensure_future(_stream(c, "/v1/chat/completions", body, 4))
                kept = [asyncio.ensure_future(_stream(c, "/v1/chat/completions", body))
                        for _ in range(2)]
                whole = asyncio.ensure_future(_post(c, "/v1/chat/completions", body))
                await _attached(server, 5)
            return await first, [await dropped, *await asyncio.gather(*kept)], await whole

    first, (dropped, *kept), whole = asyncio.run(main())
    assert not first["done"] and not dropped["done"]
    assert len(whole) > len(first["text"])
    assert all(k["done"] and k["text"] == whole for k in kept)
    m = server.wait_idle()
    assert m["peregrine:kv_cache_usage"] == 0
    assert _delta(server, before, ABORTED) == 0  # the engine request ran to its end
    assert _delta(server, before, LENGTH) == 1
    assert _delta(server, before, GENERATED) == max_tokens
    # The two that left got only part of the text: fewer tokens saved than 4 whole copies.
    assert 2 * max_tokens <= _delta(server, before, SAVED) < 4 * max_tokens


def test_the_engine_request_is_aborted_when_every_client_left(server):
    body = _chat(2000)
    before = server.metrics()

    async def main() -> list:
        async with _client(server) as c, _client(server, read=3.0) as impatient:
            async with _engine_held(server):
                tasks = [asyncio.ensure_future(_stream(c, "/v1/chat/completions", body, k))
                         for k in (1, 2, 3)]
                tasks.append(asyncio.ensure_future(
                    _post(impatient, "/v1/chat/completions", {**body, "stream": False})))
                await _attached(server, 4)
            return await asyncio.gather(*tasks, return_exceptions=True)

    *streams, post = asyncio.run(main())
    assert all(not s["done"] for s in streams)
    assert isinstance(post, httpx.ReadTimeout)
    m = server.wait_idle(timeout=30)  # long before 2000 tokens could be generated
    assert m["peregrine:kv_cache_usage"] == 0
    assert m["peregrine:num_requests_running"] == 0
    assert _delta(server, before, COALESCED) == 3
    assert _delta(server, before, ABORTED) == 1
    assert _delta(server, before, GENERATED) < 2000
    assert server.app.state.peregrine.ctx.requests.num_clients == 0
    asyncio.run(server.engine.call(lambda engine: engine.check_invariants()))


def test_without_coalescing_every_request_runs(plain_server):
    max_tokens = 24
    body = _chat(max_tokens)
    before = plain_server.metrics()

    async def main() -> list[str]:
        async with _client(plain_server) as c:
            async with _engine_held(plain_server):
                tasks = [asyncio.ensure_future(_post(c, "/v1/chat/completions", body))
                         for _ in range(3)]
                while plain_server.engine.num_waiting < 3:
                    await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks)

    texts = asyncio.run(main())
    assert len(set(texts)) == 1
    plain_server.wait_idle()
    assert _delta(plain_server, before, COALESCED) == 0
    assert _delta(plain_server, before, GENERATED) == 3 * max_tokens
