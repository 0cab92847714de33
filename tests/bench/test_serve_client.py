"""The serving benchmark's client: SSE parsing, vLLM's metric definitions, and real HTTP
streams from the small OpenAI-style server of tests/bench/conftest.py."""

from __future__ import annotations

import asyncio
import math

import pytest

from peregrine.bench.datasets import BenchRequest
from peregrine.bench.serve import (RequestResult, arrival_gaps, check_endpoint, discover_model,
                                   parse_goodput, request_body, run_load, serve_metrics,
                                   sse_events)


async def _lines(lines):
    for line in lines:
        yield line


def collect(lines):
    async def go():
        return [e async for e in sse_events(_lines(lines))]
    return asyncio.run(go())


def test_sse_events_join_data_lines_and_skip_comments():
    lines = [": ping", "data: {\"a\": 1}", "", "event: x", "data: line1", "data:line2", "",
             "data: [DONE]"]
    assert collect(lines) == ['{"a": 1}', "line1\nline2", "[DONE]"]


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(None) == {}
    for bad, msg in (["itl:5"], "key must be one of"), (["ttft:x"], "KEY:MILLISECONDS"), \
                    (["tpot:0"], "must be > 0"):
        with pytest.raises(ValueError, match=msg):
            parse_goodput(bad)


def test_request_body_asks_for_greedy_streaming_with_usage():
    req = BenchRequest(3, 7, prompt_token_ids=[1, 2, 3])
    body = request_body(req, "/v1/completions", "m", {"top_k": 1}, ignore_eos=True)
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 7
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0 and body["ignore_eos"] and body["top_k"] == 1
    chat = request_body(BenchRequest(3, 7, prompt="hi"), "/v1/chat/completions", "m", {},
                        ignore_eos=False)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "ignore_eos" not in chat
    with pytest.raises(ValueError, match="text prompts"):
        request_body(req, "/v1/chat/completions", "m", {}, True)


def test_metrics_follow_vllm_definitions():
    a = RequestResult(prompt_len=10, ok=True, output_tokens=5, ttft=0.1, latency=0.5,
                      itl=[0.1, 0.1, 0.1, 0.1])
    b = RequestResult(prompt_len=20, ok=True, output_tokens=1, ttft=0.2, latency=0.2)
    c = RequestResult(prompt_len=30, error="HTTP 500: boom")
    m = serve_metrics([a, b, c], duration=2.0, slos={"ttft": 150.0})
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["prompt_tokens"] == 30 and m["output_tokens"] == 6
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0
    assert m["total_token_throughput"] == 18.0
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)  # (0.5 - 0.1) / (5 - 1); b has none
    assert m["ttft_ms"]["median"] == pytest.approx(150.0)
    assert m["itl_ms"]["p99"] == pytest.approx(100.0)
    assert m["goodput"]["good_requests"] == 1  # b's TTFT of 200 ms misses the 150 ms SLO
    assert m["errors"] == ["HTTP 500: boom"]


def _run(url, model, reqs, endpoint="/v1/completions", **kw):
    return asyncio.run(run_load(url, endpoint, model, reqs, **kw))


def test_streams_are_timed_chunk_by_chunk(fake_server):
    reqs = [BenchRequest(3, n, prompt="hello") for n in (1, 4, 6)]
    results, duration = _run(fake_server, "fake-model", reqs, max_concurrency=2)
    assert all(r.ok for r in results) and duration > 0
    assert [r.output_tokens for r in results] == [1, 4, 6]
    assert {r.tokens_from for r in results} == {"usage"}
    for r in results:
        assert len(r.itl) == r.output_tokens - 1
        assert 0 < r.ttft <= r.latency
        assert r.ttft + sum(r.itl) <= r.latency + 1e-6
        assert r.prompt_len == 3  # from usage
    assert results[2].text == "t0 t1 t2 t3 t4 t5 "


def test_without_usage_the_count_comes_from_finish_reason_or_chunks(fake_server):
    results, _ = _run(fake_server, "no-usage", [BenchRequest(3, 5, prompt="x")])
    assert (results[0].output_tokens, results[0].tokens_from) == (5, "length")
    results, _ = _run(fake_server, "stop-early", [BenchRequest(3, 5, prompt="x")])
    assert (results[0].output_tokens, results[0].tokens_from) == (5, "chunks")


def test_a_closing_chunk_without_text_is_no_token(fake_server):
    # llama-server ends a stream with an empty-text chunk carrying finish_reason and usage.
    results, _ = _run(fake_server, "closing-chunk", [BenchRequest(3, 4, prompt="x")])
    r = results[0]
    assert r.ok and (r.output_tokens, r.tokens_from) == (4, "usage")
    assert len(r.itl) == 3 and r.text == "t0 t1 t2 t3 "


def test_chat_ttft_waits_for_content_not_the_role_chunk(fake_server):
    results, _ = _run(fake_server, "fake-model", [BenchRequest(3, 3, prompt="x")],
                      endpoint="/v1/chat/completions")
    r = results[0]
    assert r.ok and r.text == "t0 t1 t2 " and len(r.itl) == 2
    assert r.ttft >= 0.004  # the first content chunk comes after a 5 ms sleep


def test_a_failed_request_is_counted_not_raised(fake_server):
    results, duration = _run(fake_server, "fake-model",
                             [BenchRequest(1, 2, prompt="fail"), BenchRequest(1, 2, prompt="ok")])
    assert not results[0].ok and "HTTP 400" in results[0].error
    assert results[1].ok
    m = serve_metrics(results, duration)
    assert (m["completed"], m["failed"]) == (1, 1)


def test_arrivals_are_poisson_at_the_rate_or_all_at_once():
    import numpy as np
    assert arrival_gaps(50, math.inf) == [0.0] * 49
    gaps = arrival_gaps(4001, 8.0)
    assert len(gaps) == 4000  # none after the last request
    assert np.mean(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean; burstier gaps vary more.
    assert np.std(gaps) == pytest.approx(1 / 8.0, rel=0.1)
    bursty = arrival_gaps(4001, 8.0, burstiness=0.25)
    assert np.mean(bursty) == pytest.approx(1 / 8.0, rel=0.1) and np.std(bursty) > 0.2
    assert arrival_gaps(30, 8.0, seed=3) == arrival_gaps(30, 8.0, seed=3)
    with pytest.raises(ValueError, match="burstiness"):
        arrival_gaps(3, 1.0, burstiness=0)


def test_discovery_and_the_endpoint_check(fake_server):
    assert discover_model(fake_server) == "fake-model"
    assert check_endpoint(fake_server, "/v1/completions", "fake-model", {}, True, None).ok
    with pytest.raises(RuntimeError, match="failed"):
        check_endpoint(fake_server + "/nowhere", "/v1/completions", "fake-model", {}, True,
                       None)
