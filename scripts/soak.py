"""Soak a real `peregrine serve` with mixed, partly abusive traffic and watch its resources.

Workers send, at random: plain and streamed completions and chats, streams dropped after a
few chunks, requests cut by a client timeout, malformed or over-limit requests, and bursts
that overflow a small queue (429s). Every few seconds the server process's RSS and open
file descriptors and its KV usage are sampled. At the end the server must go idle with no
KV block held, have answered no 5xx, and its memory must be flat after warm-up.

    python scripts/soak.py --duration 600 --out docs/bench-results/soak.json

Prints a summary table and writes the JSON (requests, answers by status, outcomes, RSS and
fd samples, the verdicts)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
from peregrine.bench.launch import wait_until_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["Once upon a time", "The capital of France is", "List three colours:",
           "def fibonacci(n):", "Write a haiku about the sea.", "Explain photosynthesis."]
BAD_BODIES = [b'{"prompt": ', b'{"prompt": "a", "max_tokens": "10"}',
              b'{"prompt": "a\\ud800"}', b'{"prompt": "a", "n": 100000}',
              b'{"prompt": "a", "temperature": 1e308}', b"[" * 5000 + b"]" * 5000,
              b'{"messages": "hi"}', b'{"prompt": "a", "stop": ["1","2","3","4","5"]}']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Tally:
    """Thread-safe counts of answers by status and of outcomes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: collections.Counter[str] = collections.Counter()
        self.outcome: collections.Counter[str] = collections.Counter()
        self.server_errors: list[str] = []

    def add(self, outcome: str, status: int | None = None, body: str = "") -> None:
        with self.lock:
            self.outcome[outcome] += 1
            if status is not None:
                self.status[str(status)] += 1
                if status >= 500:
                    self.server_errors.append(f"{status}: {body[:300]}")


def one_request(client: httpx.Client, rng: random.Random, tally: Tally) -> None:
    kind = rng.choices(["complete", "chat", "stream", "drop", "timeout", "bad", "burst"],
                       weights=[20, 20, 20, 10, 10, 15, 5])[0]
    prompt = rng.choice(PROMPTS)
    max_tokens = rng.randint(1, 48)
    try:
        if kind == "complete":
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": rng.random()})
            tally.add(kind, r.status_code, r.text)
        elif kind == "chat":
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
            tally.add(kind, r.status_code, r.text)
        elif kind in ("stream", "drop"):
            keep = rng.randint(1, 4) if kind == "drop" else None
            with client.stream("POST", "/v1/completions", json={
                    "prompt": prompt, "max_tokens": max_tokens, "stream": True}) as r:
                status = r.status_code
                for i, _ in enumerate(r.iter_lines()):
                    if keep is not None and i >= keep:
                        break  # leaving the block closes the connection mid-stream
            tally.add(kind, status)
        elif kind == "timeout":
            try:
                r = client.post("/v1/completions", timeout=rng.uniform(0.05, 0.5),
                                json={"prompt": prompt, "max_tokens": 48, "ignore_eos": True})
                tally.add(kind, r.status_code, r.text)
            except httpx.TimeoutException:
                tally.add("timeout_cut")
        elif kind == "bad":
            r = client.post("/v1/completions", content=rng.choice(BAD_BODIES),
                            headers={"content-type": "application/json"})
            tally.add(kind, r.status_code, r.text)
        else:  # a burst of parallel requests against a small queue: some get 429
            def fire() -> None:
                rr = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8})
                tally.add("burst", rr.status_code, rr.text)
            threads = [threading.Thread(target=fire) for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    except httpx.HTTPError as e:
        tally.add(f"client_error:{type(e).__name__}")


def soak(duration: float, workers: int, sample_every: float, extra_args: list[str]
         ) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "peregrine.cli", "serve", "--port", str(port),
           "--max-queue-len", "8", "--kv-cache-memory", "0.25", *extra_args]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, timeout_s=300)
        tally = Tally()
        stop = threading.Event()
        samples: list[dict[str, float]] = []
        start = time.monotonic()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=120) as client:
                while not stop.is_set():
                    one_request(client, rng, tally)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(workers)]
        for t in threads:
            t.start()
        while time.monotonic() - start < duration:
            text = httpx.get(url + "/metrics", timeout=30).text
            samples.append({"t": round(time.monotonic() - start, 1),
                            "rss_mb": rss_bytes(server.pid) / 2**20,
                            "fds": open_fds(server.pid),
                            "kv_usage": metric(text, "peregrine:kv_cache_usage"),
                            "running": metric(text, "peregrine:num_requests_running")})
            time.sleep(sample_every)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        # idle: nothing running or waiting and no KV block held
        idle_deadline = time.monotonic() + 60
        while True:
            text = httpx.get(url + "/metrics", timeout=30).text
            kv = metric(text, "peregrine:kv_cache_usage")
            busy = (metric(text, "peregrine:num_requests_running")
                    + metric(text, "peregrine:num_requests_waiting"))
            if (kv == 0 and busy == 0) or time.monotonic() > idle_deadline:
                break
            time.sleep(0.2)
        alive = httpx.post(url + "/v1/completions", timeout=60,
                           json={"prompt": "Hello", "max_tokens": 2}).status_code == 200
        final = {"rss_mb": rss_bytes(server.pid) / 2**20, "fds": open_fds(server.pid),
                 "kv_usage": kv}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    warm = [s for s in samples if s["t"] >= 0.1 * duration] or samples
    rss = [s["rss_mb"] for s in samples]
    growth = final["rss_mb"] - warm[0]["rss_mb"]
    return {
        "duration_s": duration, "workers": workers, "server_args": cmd[3:],
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
        "requests": sum(tally.outcome.values()),
        "answers_by_status": dict(sorted(tally.status.items())),
        "outcomes": dict(sorted(tally.outcome.items())),
        "server_errors": tally.server_errors[:20],
        "rss_mb": {"start": rss[0], "after_warmup": warm[0]["rss_mb"], "end": final["rss_mb"],
                   "max": max(rss + [final["rss_mb"]])},
        "rss_growth_after_warmup_mb": growth,
        "fds": {"start": samples[0]["fds"], "end": final["fds"],
                "max": max(s["fds"] for s in samples)},
        "kv_usage_after": final["kv_usage"], "alive_after": alive,
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--rss-bound-mb", type=float, default=64.0,
                        help="most RSS growth after warm-up (first 10%%) that counts as flat")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    ns, extra = parser.parse_known_args()
    report = soak(ns.duration, ns.workers, ns.sample_every, extra)
    report["rss_bound_mb"] = ns.rss_bound_mb
    report["verdicts"] = {
        "no_5xx": not report["server_errors"],
        "kv_back_to_zero": report["kv_usage_after"] == 0,
        "memory_flat": report["rss_growth_after_warmup_mb"] <= ns.rss_bound_mb,
        "fds_flat": report["fds"]["end"] <= report["fds"]["start"] + 8,
        "alive_after": report["alive_after"],
    }
    print(f"soak: {report['duration_s']:.0f}s, {report['workers']} workers, "
          f"{report['requests']} requests")
    print("answers by status: " + ", ".join(f"{k}: {v}" for k, v in
                                           report["answers_by_status"].items()))
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in report["outcomes"].items()))
    r = report["rss_mb"]
    print(f"RSS MB: start {r['start']:.0f}, after warm-up {r['after_warmup']:.0f}, "
          f"end {r['end']:.0f}, max {r['max']:.0f}; fds {report['fds']}")
    print("verdicts: " + ", ".join(f"{k}={v}" for k, v in report["verdicts"].items()))
    if ns.out:
        os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
        with open(ns.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(report["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
