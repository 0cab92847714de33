"""What request coalescing saves: N identical concurrent greedy requests against a live
server with coalescing on, then against one with --no-request-coalescing, in one run.

    .venv/bin/python scripts/bench_coalescing.py [--requests 32] [--prompt-tokens 64]
        [--tokens 64] [--out docs/bench-results/coalescing.json]

Each server is a `peregrine serve` process of its own (the clients' Python must not share
the server's interpreter lock). Each request is a streamed /v1/completions call with the
same prompt (token ids) and the same greedy parameters (ignore_eos, so every one generates
exactly --tokens). Prints a markdown table (wall time, median and p99 latency, tokens the
engine computed according to /metrics, tokens/s delivered to the clients) and saves it
with the machine as JSON."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.server.conftest import parse_metrics  # noqa: E402
from peregrine.bench.launch import stop_server, wait_until_healthy

TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a "
        "lantern, a notebook and a thermos of strong tea. From the gallery he watched the "
        "fishing boats come home, counted the gulls on the breakwater, and wrote down the "
        "colour of the sea, which was never the same twice. ") * 4


def machine() -> dict[str, Any]:
    """The CPU model and its SIMD flags, the core count and the versions."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = sorted(f for f in flags if f in ("avx2", "fma") or f.startswith("avx512"))
    return {"cpu": fields.get("Model name", platform.processor()).strip(),
            "simd": simd, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()}


class Server:
    """A `peregrine serve` subprocess on a free port."""

    def __init__(self, flags: list[str]) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = self.url + "/v1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peregrine.cli", "serve", "--port", str(self.port),
             "--kv-cache-memory", "0.25", "--embedding-model", "none", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until_healthy(self.url, self.proc)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=30).text)

    def wait_idle(self) -> dict[str, float]:
        """/metrics once nothing runs or waits and no KV block is held."""
        while True:
            m = self.metrics()
            if (m.get("peregrine:num_requests_running") == 0 and m.get(
                    "peregrine:num_requests_waiting") == 0
                    and m.get("peregrine:kv_cache_usage") == 0):
                return m
            time.sleep(0.1)

    def stop(self) -> None:
        stop_server(self.proc)


async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, str]:
    """A streamed completion: its latency (send to [DONE]) and its text."""
    t0 = time.perf_counter()
    text = ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    return time.perf_counter() - t0, text


def run(server: Server, prompt: list[int], requests: int, tokens: int
        ) -> dict[str, Any]:
    """Send the requests at once; wall time, latencies and the engine's counters."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    # A warm-up with another prompt: the bench prompt starts out of the prefix cache.
    httpx.post(server.api + "/completions", json={"prompt": "Hello", "max_tokens": 4},
               timeout=300).raise_for_status()
    before = server.metrics()

    async def main() -> tuple[float, list[tuple[float, str]]]:
        limits = httpx.Limits(max_connections=requests, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=900, limits=limits) as c:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(c, body) for _ in range(requests)))
            return time.perf_counter() - t0, results

    wall, results = asyncio.run(main())
    after = server.wait_idle()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    latencies = sorted(t for t, _ in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {"wall_s": wall, "median_latency_s": statistics.median(latencies),
            "p99_latency_s": p99,
            "engine_generation_tokens": delta("peregrine:generation_tokens_total"),
            "engine_prompt_tokens": delta("peregrine:prompt_tokens_total"),
            "coalesced_requests": delta("peregrine:coalesced_requests_total"),
            "tokens_saved": delta("peregrine:coalesced_tokens_saved_total"),
            "delivered_tokens": requests * tokens,
            "delivered_tok_s": requests * tokens / wall,
            "identical_texts": len({text for _, text in results}) == 1,
            "text": results[0][1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="docs/bench-results/coalescing.json")
    a = ap.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    for name, flag in (("on", "--request-coalescing"), ("off", "--no-request-coalescing")):
        server = Server([flag, "--max-queue-len", str(max(256, a.requests))])
        try:
            ids = httpx.post(server.url + "/tokenize", timeout=60, json={
                "prompt": TEXT, "add_special_tokens": False}).json()["tokens"]
            prompt = ids[:a.prompt_tokens]
            assert len(prompt) == a.prompt_tokens, "TEXT is too short for --prompt-tokens"
            rows[name] = run(server, prompt, a.requests, a.tokens)
        finally:
            server.stop()
        print(f"coalescing {name}: {rows[name]['wall_s']:.2f} s", flush=True)
    assert rows["on"]["text"] == rows["off"]["text"], "coalescing changed the greedy text"

    header = ("| coalescing | wall (s) | median latency (s) | p99 latency (s) | tokens the "
              "engine generated | prompt tokens computed | coalesced requests | tokens/s "
              "delivered |\n|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {name} | {r['wall_s']:.2f} | {r['median_latency_s']:.2f} | "
        f"{r['p99_latency_s']:.2f} | {r['engine_generation_tokens']:.0f} | "
        f"{r['engine_prompt_tokens']:.0f} | {r['coalesced_requests']:.0f} | "
        f"{r['delivered_tok_s']:.1f} |" for name, r in rows.items()]
    table = "\n".join(lines)
    speedup = rows["off"]["wall_s"] / rows["on"]["wall_s"]
    m = machine()
    print(f"\n{a.requests} identical concurrent greedy requests, {a.prompt_tokens}-token "
          f"prompt, {a.tokens} new tokens each; {m['cpu']} ({', '.join(m['simd'])}), "
          f"{m['cores']} cores\n\n{table}\n\nwall time off / on: {speedup:.1f}x")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with open(a.out, "w") as f:
        json.dump({"requests": a.requests, "prompt_tokens": a.prompt_tokens,
                   "tokens": a.tokens, "machine": m, "commit": commit,
                   "date": datetime.date.today().isoformat(),
                   "command": "python scripts/bench_coalescing.py " + " ".join(sys.argv[1:]),
                   "rows": {k: {kk: vv for kk, vv in v.items() if kk != "text"}
                            for k, v in rows.items()},
                   "speedup_wall": speedup, "table": table}, f, indent=2)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
