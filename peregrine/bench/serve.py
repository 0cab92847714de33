"""Online serving benchmark: stream requests at an OpenAI-compatible endpoint and measure
latency as a user sees it.

Metric definitions follow vLLM's `vllm bench serve`, so numbers compare:

- TTFT: from sending the request to the first streamed chunk that carries a choice
  (/v1/completions; /v1/chat/completions: the first chunk with non-empty content, so a
  role-only opening chunk does not count). A closing chunk with empty text and only a
  finish_reason (llama-server sends one after the last token) is no token.
- ITL: the gaps between consecutive such chunks, pooled over all requests.
- TPOT per request: (E2E - TTFT) / (output_tokens - 1), for requests with > 1 token.
- E2E: from sending the request to the end of its stream.
- output_tokens: `usage.completion_tokens` (asked for with stream_options.include_usage);
  when the server sends no usage: max_tokens if the stream ended with finish_reason
  "length" (that is what "length" means), else the number of chunks.
- Throughput: completed requests, output tokens, and prompt + output tokens over the wall
  time of the run (first request sent to last response finished).
- Goodput: completed requests per second that met every SLO given (TTFT, TPOT, E2E in ms).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peregrine.bench.datasets import BenchRequest
from peregrine.bench.stats import summarize

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What one streamed request measured (times in seconds)."""

    prompt_len: int
    ok: bool = False
    output_tokens: int = 0
    tokens_from: str = ""  # usage | length | chunks
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS:
            raise ValueError(f"goodput SLO {item!r}: the key must be one of {SLO_KEYS}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: expected KEY:MILLISECONDS") from None
        if slos[key] <= 0:
            raise ValueError(f"goodput SLO {item!r}: the bound must be > 0 ms")
    return slos


def request_body(req: BenchRequest, endpoint: str, model: str, extra: dict[str, Any],
                 ignore_eos: bool) -> dict[str, Any]:
    """The JSON body of one streaming request: greedy, exactly as many tokens as the
    workload says (with `ignore_eos`), usage in the last chunk."""
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "/v1/chat/completions":
        if req.prompt is None:
            raise ValueError("the chat endpoint needs text prompts (--prompt-format text)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.api_prompt()
    if ignore_eos:
        body["ignore_eos"] = True
    return {**body, **extra}


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data payloads of a server-sent-event stream (multi-line data joined by \\n;
    comments and other fields skipped)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


async def stream_request(client: Any, url: str, body: dict[str, Any], prompt_len: int,
                         headers: dict[str, str]) -> RequestResult:
    """Send one streaming request and time its chunks."""
    chat = url.endswith("/chat/completions")
    res = RequestResult(prompt_len=prompt_len)
    chunks = 0
    usage_tokens: int | None = None
    finish_reason = None
    st = time.perf_counter()
    last = st
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                res.error = f"HTTP {resp.status_code}: {detail}"
                return res
            async for data in sse_events(resp.aiter_lines()):
                if data.strip() == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    res.error = f"error event: {obj['error']}"
                    return res
                if choices := obj.get("choices"):
                    c = choices[0]
                    finish_reason = c.get("finish_reason") or finish_reason
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    # A closing chunk with no text and a finish_reason (llama-server sends
                    # one after the last token) carries no token.
                    closing = not text and c.get("finish_reason") is not None
                    if (not chat or text) and not closing:
                        now = time.perf_counter()
                        if chunks == 0:
                            res.ttft = now - st
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
                        res.text += text or ""
                if usage := obj.get("usage"):
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
                    if usage.get("prompt_tokens"):
                        res.prompt_len = int(usage["prompt_tokens"])
    except Exception as e:  # a connection error is one failed request, not a failed run
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - st
    if usage_tokens is not None:
        res.output_tokens, res.tokens_from = int(usage_tokens), "usage"
    elif finish_reason == "length" and body.get("max_tokens"):
        res.output_tokens, res.tokens_from = int(body["max_tokens"]), "length"
    else:
        res.output_tokens, res.tokens_from = chunks, "chunks"
    res.ok = chunks > 0
    if not res.ok:
        res.error = "the stream carried no tokens"
    return res


def arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait after each of n requests but the last: exponential with mean 1/rate
    (a Poisson process) for burstiness 1, gamma-distributed with the same mean otherwise
    (lower is burstier); all zero when rate is inf."""
    if math.isinf(rate):
        return [0.0] * max(n - 1, 0)
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    return [float(g) for g in rng.gamma(burstiness, 1.0 / (rate * burstiness), max(n - 1, 0))]


async def arrivals(requests: list[BenchRequest], rate: float, burstiness: float,
                   seed: int) -> AsyncIterator[BenchRequest]:
    """Yield the requests spaced by `arrival_gaps`."""
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    for i, req in enumerate(requests):
        yield req
        if i < len(gaps) and gaps[i] > 0:
            await asyncio.sleep(gaps[i])


async def run_load(base_url: str, endpoint: str, model: str, requests: list[BenchRequest],
                   rate: float = math.inf, max_concurrency: int | None = None,
                   burstiness: float = 1.0, seed: int = 0, ignore_eos: bool = True,
                   extra_body: dict[str, Any] | None = None, api_key: str | None = None,
                   timeout_s: float = 600.0) -> tuple[list[RequestResult], float]:
    """Send every request (arrivals by `rate`, at most `max_concurrency` in flight); the
    results in workload order and the run's wall time."""
    import httpx
    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    extra = extra_body or {}
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) + 1,
                          max_keepalive_connections=max_concurrency or len(requests) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def one(req: BenchRequest) -> RequestResult:
            body = request_body(req, endpoint, model, extra, ignore_eos)
            if sem is None:
                return await stream_request(client, url, body, req.prompt_len, headers)
            async with sem:  # like vLLM, TTFT starts when the request is actually sent
                return await stream_request(client, url, body, req.prompt_len, headers)

        tasks = []
        t0 = time.perf_counter()
        async for req in arrivals(requests, rate, burstiness, seed):
            tasks.append(asyncio.create_task(one(req)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    return results, duration


def serve_metrics(results: list[RequestResult], duration: float,
                  slos: dict[str, float] | None = None) -> dict[str, Any]:
    """vLLM's serving metrics of one run (latencies in ms)."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    itls = [g for r in ok for g in r.itl]
    e2els = [r.latency for r in ok]
    prompt = sum(r.prompt_len for r in ok)
    output = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "prompt_tokens": prompt, "output_tokens": output,
        "output_tokens_from": sorted({r.tokens_from for r in ok}),
        "request_throughput": len(ok) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration,
        "ttft_ms": summarize(ttfts, 1000), "tpot_ms": summarize(tpots, 1000),
        "itl_ms": summarize(itls, 1000), "e2el_ms": summarize(e2els, 1000),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    if slos:
        good = sum(1 for r in ok if _meets(r, slos))
        out["goodput"] = {"slos_ms": slos, "good_requests": good,
                          "request_goodput": good / duration}
    out["per_request"] = {"ttft_ms": [1000 * x for x in ttfts],
                          "tpot_ms": [1000 * (r.tpot or 0.0) for r in ok],
                          "e2el_ms": [1000 * x for x in e2els],
                          "output_tokens": [r.output_tokens for r in ok],
                          "itl_ms": [1000 * x for x in itls]}
    return out


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft * 1000, "tpot": (r.tpot or 0.0) * 1000, "e2el": r.latency * 1000}
    return all(values[k] <= bound for k, bound in slos.items())


def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id the server lists at /v1/models."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --served-model")
    return data[0]["id"]


def check_endpoint(base_url: str, endpoint: str, model: str, extra: dict[str, Any],
                   ignore_eos: bool, api_key: str | None, wait_s: float = 120.0
                   ) -> RequestResult:
    """One short request before the measurement: fails fast, with the server's own error,
    when the endpoint or the body is wrong, and warms the server up. A 503 (still loading)
    is retried for up to `wait_s` seconds."""
    probe = BenchRequest(4, 2, prompt="Hello, my name is")
    deadline = time.monotonic() + wait_s
    while True:
        results, _ = asyncio.run(run_load(base_url, endpoint, model, [probe],
                                          ignore_eos=ignore_eos, extra_body=extra,
                                          api_key=api_key, timeout_s=120))
        res = results[0]
        if res.ok:
            return res
        if not res.error.startswith("HTTP 503") or time.monotonic() > deadline:
            raise RuntimeError(f"the test request to {base_url}{endpoint} failed: {res.error}")
        time.sleep(1.0)
