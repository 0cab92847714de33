"""Clients that go away abort their requests: KV blocks come back at once, others finish."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

ABORTED = 'peregrine:request_success_total{finished_reason="abort"}'


def _body(i: int, max_tokens: int, stream: bool = True) -> dict:
    return {"messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            "stream_options": {"include_usage": True}}


async def _stream(client: httpx.AsyncClient, i: int, drop_after: int | None,
                  max_tokens: int) -> dict:
    """One streamed chat; closes the connection after `drop_after` content chunks."""
    pieces, usage, finish, done = 0, None, None, False
    async with client.stream("POST", "/v1/chat/completions", json=_body(i, max_tokens)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                pieces += bool(choice["delta"].get("content"))
                finish = choice.get("finish_reason") or finish
            if drop_after is not None and pieces >= drop_after:
                break  # leaving the block closes the connection mid-stream
    return {"pieces": pieces, "usage": usage, "finish": finish, "done": done}


def test_16_streams_half_dropped(server):
    before = server.metrics().get(ABORTED, 0)
    max_tokens = 16

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(
                _stream(c, i, 2 if i % 2 else None, max_tokens) for i in range(16)))

    results = asyncio.run(main())
    kept, dropped = results[0::2], results[1::2]
    for r in kept:
        assert r["done"] and r["finish"] == "length"
        assert r["usage"]["completion_tokens"] == max_tokens
    assert all(not r["done"] for r in dropped)

    m = server.wait_idle()
    assert m["peregrine:kv_cache_usage"] == 0
    assert m["peregrine:num_requests_running"] == 0 and m["peregrine:num_requests_waiting"] == 0
    assert m[ABORTED] - before == 8
    stats = server.engine.stats()
    assert stats.kv_cache_usage == 0 and stats.num_running == 0
    assert stats.num_free_blocks == stats.num_kv_blocks
    asyncio.run(server.engine.call(lambda engine: engine.check_invariants()))


def test_disconnect_frees_the_blocks_at_once(server):
    before = server.metrics().get(ABORTED, 0)

    async def main() -> float:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
            async with c.stream("POST", "/v1/chat/completions", json=_body(0, 2000)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and \
                            json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break
                held = server.metrics()["peregrine:kv_cache_usage"]
        return held

    assert asyncio.run(main()) > 0  # the running request held blocks
    m = server.wait_idle(timeout=20)  # long before 2000 tokens could be generated
    assert m["peregrine:kv_cache_usage"] == 0
    assert m[ABORTED] - before == 1


def test_non_streaming_client_timeout_aborts(server):
    before = server.metrics().get(ABORTED, 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=_body(0, 2000, stream=False),
                   timeout=httpx.Timeout(60, read=1.5))
    m = server.wait_idle(timeout=20)
    assert m["peregrine:kv_cache_usage"] == 0
    assert m[ABORTED] - before == 1
