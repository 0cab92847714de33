"""Several models on one server, measured: load and unload times (and what unloading gives
back), and a quiet model's time to first token while another model is saturated, with the
engines' steps under the fair arbiter (--fair-share) and without.

    .venv/bin/python scripts/bench_router.py [--rounds 2] [--quiet-requests 8]
        [--busy-streams 8] [--skip-dummy]

1. Load/unload: `peregrine serve --models-config` with the default model (smollm2-135m,
   GGUF Q4_1), the same model in float (quantization none), and a shipped config with
   random weights (qwen2.5-0.5b, load_format dummy); each is loaded
   and unloaded through the admin routes `rounds` times: wall time of each call, the
   server's RSS after each, and the router's estimate of the model's memory.
2. Fairness: two copies of the default model, `busy` and `quiet`. `busy` runs
   `busy_streams` streams of 64 tokens back to back; meanwhile `quiet` gets one short
   streamed completion every 0.5 s; its TTFT (send to first token) against the same with
   `busy` idle, with --fair-share and --no-fair-share, and busy's tokens/s meanwhile.
Prints a table and saves docs/bench-results/router.json (with the machine and load)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
from peregrine.bench.launch import stop_server, wait_until_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "bench-results", "router.json")
PROMPT = ("The river ran past the old mill and under the stone bridge, where the children "
          "of the village gathered every evening to watch the boats. One of them said")


def machine() -> dict[str, Any]:
    """The CPU model and its SIMD flags, the core count, the versions and the load."""
    import torch
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = sorted(f for f in flags if f in ("avx", "avx2", "fma", "f16c")
                  or f.startswith("avx512") or f.startswith("amx"))
    return {"cpu": fields.get("Model name", platform.processor()).strip(), "simd": simd,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()}


class Server:
    """A `peregrine serve --models-config` subprocess on a free port."""

    def __init__(self, models_toml: str, flags: list[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-router-")
        path = os.path.join(self.dir, "models.toml")
        with open(path, "w") as f:
            f.write(models_toml)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peregrine.cli", "serve", "--port", str(self.port),
             "--models-config", path, "--embedding-model", "none", "--keep-alive", "0",
             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        wait_until_healthy(self.url, self.proc)

    def rss(self) -> int:
        """The server's resident memory, bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb * 1024

    def models(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in httpx.get(self.url + "/v1/models", timeout=30).json()["data"]}

    def admin(self, name: str, action: str) -> float:
        """POST /v1/models/{name}/{action}; its wall time."""
        t0 = time.perf_counter()
        r = httpx.post(f"{self.url}/v1/models/{name}/{action}", timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0

    def stop(self) -> None:
        stop_server(self.proc)


def load_unload(rounds: int, dummy: bool) -> list[dict[str, Any]]:
    """Load and unload each model `rounds` times through the admin routes."""
    toml = ('[[models]]\nserved_name = "default"\nkv_cache_memory = 0.25\n\n'
            '[[models]]\nserved_name = "default-float"\nquantization = "none"\n'
            'kv_cache_memory = 0.25\n')
    if dummy:
        toml += ('\n[[models]]\nmodel = "qwen2.5-0.5b"\nload_format = "dummy"\n'
                 'kv_cache_memory = 0.25\nmax_model_len = 2048\n')
    server = Server(toml, [])
    rows = []
    try:
        names = list(server.models())
        server.admin(names[0], "unload")
        for name in names:
            loads, unloads, rss_loaded, rss_after = [], [], [], []
            for _ in range(rounds):
                base = server.rss()
                loads.append(server.admin(name, "load"))
                rss_loaded.append(server.rss() - base)
                unloads.append(server.admin(name, "unload"))
                rss_after.append(server.rss() - base)
            card = server.models()[name]
            rows.append({"model": name, "memory_estimate_bytes": card["memory_bytes"],
                         "load_s": loads, "unload_s": unloads,
                         "rss_growth_loaded_bytes": rss_loaded,
                         "rss_growth_after_unload_bytes": rss_after})
    finally:
        server.stop()
    return rows


async def ttft(client: httpx.AsyncClient, model: str) -> float:
    """Send to the first streamed token of a short completion."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():  # read to the end: the request must finish
            if (first is None and line.startswith("data: {")
                    and json.loads(line[6:])["choices"][0]["text"]):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no token came")
    return first


async def quiet_ttfts(url: str, requests: int, busy_streams: int) -> dict[str, Any]:
    """Quiet's TTFTs alone, then while busy is saturated (and busy's tokens/s then)."""
    limits = httpx.Limits(max_connections=busy_streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await ttft(client, "quiet")  # warm both
        await ttft(client, "busy")
        alone = []
        for _ in range(requests):
            alone.append(await ttft(client, "quiet"))
            await asyncio.sleep(0.2)
        stop = asyncio.Event()
        tokens = 0

        async def saturate() -> None:
            nonlocal tokens
            body = {"model": "busy", "prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            while not stop.is_set():
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            tokens += 1
        workers = [asyncio.ensure_future(saturate()) for _ in range(busy_streams)]
        await asyncio.sleep(3.0)  # every stream admitted and decoding
        began, tokens = time.perf_counter(), 0
        loaded = []
        for _ in range(requests):
            loaded.append(await ttft(client, "quiet"))
            await asyncio.sleep(0.5)
        busy_tok_s = tokens / (time.perf_counter() - began)
        stop.set()
        await asyncio.gather(*workers)
    return {"ttft_alone_s": alone, "ttft_busy_saturated_s": loaded,
            "busy_tokens_per_s": busy_tok_s}


def fairness(requests: int, busy_streams: int) -> list[dict[str, Any]]:
    toml = ('[[models]]\nserved_name = "busy"\nkv_cache_memory = 0.25\n\n'
            '[[models]]\nserved_name = "quiet"\nkv_cache_memory = 0.25\npinned = true\n')
    rows = []
    for flag in ("--fair-share", "--no-fair-share"):
        server = Server(toml, [flag])
        try:
            server.admin("quiet", "load")
            rows.append({"mode": flag, "load_average_before": os.getloadavg(),
                         **asyncio.run(quiet_ttfts(server.url, requests, busy_streams))})
        finally:
            server.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quiet-requests", type=int, default=8)
    p.add_argument("--busy-streams", type=int, default=8)
    p.add_argument("--skip-dummy", action="store_true", help="no qwen2.5-0.5b (dummy) model")
    ns = p.parse_args()
    m = machine()
    print(f"machine: {m['cpu']} ({m['cores']} cores, {' '.join(m['simd'])}), "
          f"load average {m['load_average'][0]:.2f}")
    loads = load_unload(ns.rounds, not ns.skip_dummy)
    save(m, ns, loads, [])
    print(f"\n{'model':<16}{'estimate MiB':>14}{'load s':>10}{'unload s':>10}"
          f"{'RSS +MiB loaded':>17}{'after unload':>14}")
    for r in loads:
        print(f"{r['model']:<16}{r['memory_estimate_bytes'] / 2**20:>14.0f}"
              f"{statistics.median(r['load_s']):>10.2f}{statistics.median(r['unload_s']):>10.2f}"
              f"{statistics.median(r['rss_growth_loaded_bytes']) / 2**20:>17.0f}"
              f"{statistics.median(r['rss_growth_after_unload_bytes']) / 2**20:>14.0f}")
    fair = fairness(ns.quiet_requests, ns.busy_streams)
    print(f"\nquiet model's TTFT, {ns.busy_streams} streams saturating the busy one")
    print(f"{'mode':<18}{'alone p50':>11}{'busy p50':>10}{'busy max':>10}{'busy tok/s':>12}")
    for r in fair:
        print(f"{r['mode']:<18}{statistics.median(r['ttft_alone_s']):>11.3f}"
              f"{statistics.median(r['ttft_busy_saturated_s']):>10.3f}"
              f"{max(r['ttft_busy_saturated_s']):>10.3f}{r['busy_tokens_per_s']:>12.1f}")
    save(m, ns, loads, fair)
    print(f"\nsaved {os.path.relpath(OUT, ROOT)}")


def save(m: dict[str, Any], ns: argparse.Namespace, loads: list[dict[str, Any]],
         fair: list[dict[str, Any]]) -> None:
    """Write what was measured so far (the load section survives a failing second one)."""
    m["load_average_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"machine": m, "args": vars(ns), "load_unload": loads, "fairness": fair},
                  f, indent=2)


if __name__ == "__main__":
    main()
