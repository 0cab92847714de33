"""Replicas on Ray Serve, measured: one plain `peregrine serve` against `peregrine serve --ray`
with two replicas, routed by prefix (the default) and by queue length alone (`--ray-router
balanced`: power of two choices, the policy of Ray's default router), on the same request set.

    .venv/bin/python scripts/bench_ray.py [--groups 4] [--per-group 6] [--concurrency 8]
        [--max-tokens 32] [--system-words 300]

The workload is groups of chat requests sharing a long system prompt (one per group) with a
question of their own, interleaved, `concurrency` in flight, streamed. Per configuration:
output tokens/s over the run, TTFT p50/p99 (send to first content token), the prefix-cache
hit rate over the run (prompt tokens served from the replicas' prefix caches / prompt tokens
looked up, from the engines' own counters in /metrics), and the latency of a one-token
request (what a request pays besides the model: the Ray hops). The plain server runs twice:
with one thread, and with the replicas' cores as threads. Prints a table and saves
docs/bench-results/ray.json with the machine and its load."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from peregrine.bench.env import environment
from peregrine.bench.launch import free_port, stop_server, wait_until_healthy
from peregrine.bench.results import save_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "bench-results", "ray.json")
ENGINE = ["--kv-cache-memory", "0.5", "--max-model-len", "2048"]
TOPICS = ["a municipal library", "a small bakery", "a railway museum", "a mountain hut",
          "a city aquarium", "a bicycle repair shop", "a night school", "a harbour office"]
WORDS = ("always answer politely and briefly, cite the house rules when they apply, never "
         "promise what the staff cannot deliver, and keep every answer under three sentences "
         "so that visitors can read it on a small screen while they wait in line").split()


def system_prompt(group: int, words: int) -> str:
    """A long system prompt of its own for each group (the shared prefix)."""
    rng = random.Random(group)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are the assistant of {TOPICS[group % len(TOPICS)]} (desk {group}). {body}."


def workload(groups: int, per_group: int, words: int) -> list[dict[str, Any]]:
    """The chat requests, groups interleaved in a fixed shuffled order."""
    reqs = [{"messages": [{"role": "system", "content": system_prompt(g, words)},
                          {"role": "user", "content": f"Question {i}: what are your opening "
                                                      f"hours on day {i + 1} of the week?"}]}
            for g in range(groups) for i in range(per_group)]
    random.Random(0).shuffle(reqs)
    return reqs


def prefix_counters(url: str) -> tuple[float, float]:
    """(prefix-cache hits, queries) summed over every replica, in prompt tokens."""
    hits = queries = 0.0
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith("peregrine:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("peregrine:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def one(client: httpx.AsyncClient, body: dict[str, Any], max_tokens: int
              ) -> tuple[float, int, str | None]:
    """(TTFT, completion tokens, replica) of one streamed chat request."""
    sent = time.perf_counter()
    ttft = None
    tokens = 0
    payload = {**body, "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        r.raise_for_status()
        replica = r.headers.get("x-peregrine-replica")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert ttft is not None, "no token came"
    return ttft, tokens, replica


async def run_workload(url: str, reqs: list[dict[str, Any]], concurrency: int,
                       max_tokens: int) -> dict[str, Any]:
    """Send the requests `concurrency` at a time; throughput, TTFTs and where they ran."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def gated(body: dict[str, Any]) -> tuple[float, int, str | None]:
            async with gate:
                return await one(client, body, max_tokens)
        began = time.perf_counter()
        results = await asyncio.gather(*(gated(b) for b in reqs))
        wall = time.perf_counter() - began
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    placement: dict[str, dict[str, int]] = {}
    for body, (_, _, replica) in zip(reqs, results):
        group = body["messages"][0]["content"].split("(desk ")[1].split(")")[0]
        placement.setdefault(f"group {group}", {}).setdefault(str(replica)[:8], 0)
        placement[f"group {group}"][str(replica)[:8]] += 1
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "placement": placement}


def tiny_latency(url: str, n: int = 10) -> float:
    """Median seconds of a one-token completion, sent one at a time."""
    times = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n):
            began = time.perf_counter()
            r = client.post("/v1/completions", json={"prompt": f"Hi {i}", "max_tokens": 1})
            r.raise_for_status()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(name: str, flags: list[str], reqs: list[dict[str, Any]],
            ns: argparse.Namespace) -> dict[str, Any]:
    """Start a server with `flags`, warm it up, run the workload, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "peregrine.cli", "serve", "--port", str(port), *ENGINE, *flags]
    # A cluster of its own per run (no RAY_ADDRESS): every run starts cold.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "PYTHONUNBUFFERED": "1"}
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        wait_until_healthy(url, proc, timeout_s=600)
        startup = time.perf_counter() - began
        # Unrelated one-token requests: every replica up and the router made.
        tiny = tiny_latency(url)
        hits0, queries0 = prefix_counters(url)
        result = asyncio.run(run_workload(url, reqs, ns.concurrency, ns.max_tokens))
        hits1, queries1 = prefix_counters(url)
    finally:
        stop_server(proc)
    result.update(name=name, flags=flags, startup_s=startup, tiny_request_p50_s=tiny,
                  prefix_hit_rate=(hits1 - hits0) / max(queries1 - queries0, 1.0),
                  prefix_hit_tokens=hits1 - hits0, prefix_query_tokens=queries1 - queries0)
    print(f"   {result['output_tok_s']:.1f} tok/s, TTFT p50 {result['ttft_p50_s']:.2f}s "
          f"p99 {result['ttft_p99_s']:.2f}s, prefix hits {result['prefix_hit_rate']:.0%}, "
          f"one-token request {result['tiny_request_p50_s'] * 1000:.0f} ms, "
          f"startup {startup:.0f}s", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--per-group", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--system-words", type=int, default=300)
    p.add_argument("--out", default=OUT)
    ns = p.parse_args()
    cores = os.cpu_count() or 1
    reqs = workload(ns.groups, ns.per_group, ns.system_words)
    env = environment(threads=cores, argv=sys.argv[1:])
    runs = [
        measure("1 server, 1 thread", ["--num-threads", "1"], reqs, ns),
        measure(f"1 server, {cores} threads", ["--num-threads", str(cores)], reqs, ns),
        measure("2 replicas, prefix router",
                ["--ray", "--num-replicas", "2", "--replica-cpus", str(cores / 2)], reqs, ns),
        measure("2 replicas, balanced router",
                ["--ray", "--num-replicas", "2", "--replica-cpus", str(cores / 2),
                 "--ray-router", "balanced"], reqs, ns),
    ]
    env["load_average_after"] = os.getloadavg()
    print(f"\n{env['cpu']}, {cores} cores, load {env['load_average'][0]:.2f} -> "
          f"{env['load_average_after'][0]:.2f}; {len(reqs)} requests ({ns.groups} groups "
          f"sharing a {ns.system_words}-word system prompt), {ns.concurrency} in flight, "
          f"{ns.max_tokens} tokens each")
    print(f"{'configuration':30} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'prefix hits':>11} {'1-token req':>11}")
    for r in runs:
        print(f"{r['name']:30} {r['output_tok_s']:7.1f} {r['ttft_p50_s']:8.2f}s "
              f"{r['ttft_p99_s']:8.2f}s {r['prefix_hit_rate']:11.0%} "
              f"{r['tiny_request_p50_s'] * 1000:9.0f}ms")
    workload_args = {k: v for k, v in vars(ns).items() if k != "out"}
    save_json({"env": env, "workload": workload_args | {"requests": len(reqs)}, "runs": runs},
              ns.out)
    print(f"saved {os.path.relpath(ns.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
