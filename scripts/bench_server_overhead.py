"""What the HTTP layer costs: the same N requests run directly on an LLMEngine, then as N
concurrent SSE streams through a live server on the same config, alternately, R rounds.

    .venv/bin/python scripts/bench_server_overhead.py [--requests 16] [--tokens 32]
        [--rounds 2] [--out server_overhead.json]

Prints tokens/s of both and their ratio per round, and saves them as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peregrine.config import EngineConfig  # noqa: E402
from peregrine.engine.llm_engine import LLMEngine  # noqa: E402
from peregrine.sampling_params import SamplingParams  # noqa: E402
from peregrine.server.app import ServerArgs  # noqa: E402
from tests.server.conftest import serve  # noqa: E402


def direct(engine: LLMEngine, prompts: list[str], tokens: int) -> float:
    """Tokens/s of the prompts run to the end on the engine's own step loop."""
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"direct-{t0}-{i}", p,
                           SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    n = 0
    while engine.has_unfinished_requests():
        n += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return n / (time.perf_counter() - t0)


async def via_http(url: str, prompts: list[str], tokens: int) -> float:
    """Tokens/s of the prompts as concurrent streamed /v1/completions requests."""
    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        return len(prompts) * tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="server_overhead.json")
    a = ap.parse_args()
    # No prefix caching: both sides compute every prompt in full, every round.
    config = EngineConfig(kv_cache_memory=0.25, enable_prefix_caching=False)
    prompts = [f"Tell me a story about the number {i}." for i in range(a.requests)]
    engine = LLMEngine(config)
    rows = []
    with serve(ServerArgs(), config) as server:
        for r in range(a.rounds):
            d = direct(engine, prompts, a.tokens)
            h = asyncio.run(via_http(server.url, prompts, a.tokens))
            rows.append({"round": r, "direct_tok_s": d, "http_tok_s": h, "ratio": h / d})
            print(f"round {r}: direct {d:.1f} tok/s, {a.requests} HTTP streams {h:.1f} tok/s, "
                  f"ratio {h / d:.2f}", flush=True)
    with open(a.out, "w") as f:
        json.dump({"requests": a.requests, "tokens": a.tokens, "rounds": rows}, f, indent=2)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
