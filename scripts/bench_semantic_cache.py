"""The semantic cache, measured: how well it tells rewordings from near-misses, what a lookup
costs, and what it does to the throughput of a workload with repeated questions.

    .venv/bin/python scripts/bench_semantic_cache.py [--requests 80] [--max-tokens 24]
        [--concurrency 1 4] [--skip-workload]

1. Precision and recall on the labeled set (tests/data/semantic_cache_pairs.jsonl): a pair
   is a hit when the new question's similarity to the cached one reaches the threshold and
   (with verification) the verifier passes it; at --semantic-cache-threshold's default, with
   and without the verifier, and a sweep of thresholds.
2. Lookup cost: one probe's wall time (embedding, faiss search, verifier) on a store of
   1,000 and 10,000 entries: a miss, a vector hit, an exact hit; and the faiss search alone.
3. A workload on a live server (SmolLM2-135M, greedy, short answers): 50% new questions,
   30% exact repeats and 20% rewordings of earlier ones, sent 1 and 4 at a time; the same
   sequence with the cache off and on (requests/s, latency, hits, the mean lookup).
Prints a table and saves docs/bench-results/semantic_cache.json (with the machine)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peregrine.server.args import ServerArgs  # noqa: E402

PAIRS = os.path.join(ROOT, "tests", "data", "semantic_cache_pairs.jsonl")
OUT = os.path.join(ROOT, "docs", "bench-results", "semantic_cache.json")
SWEEP = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def load_pairs(path: str = PAIRS) -> list[dict[str, Any]]:
    """The labeled pairs: category, cached, new, should_hit."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Encoder:
    """The embedding model the server uses, loaded once for every cache made here."""

    def __init__(self) -> None:
        from peregrine.models.sentence_encoder import load_sentence_encoder
        self.encoder = load_sentence_encoder()

    async def load(self):
        return self.encoder


def _cache(encoder: _Encoder, **overrides: Any):
    """The server's SemanticCache (in memory), on `encoder`."""
    from peregrine.server.metrics import ServerMetrics
    from peregrine.server.semantic_cache import SemanticCache
    args = ServerArgs(semantic_cache=True, **overrides)
    return SemanticCache(args, ServerMetrics("bench", lambda: None), encoder.load)


def score_pairs(pairs: list[dict[str, Any]], encoder: _Encoder | None = None
                ) -> list[tuple[float, str | None]]:
    """Each pair's cosine similarity and the served verifier's verdict (None: pass)."""
    encoder = encoder or _Encoder()
    cache = _cache(encoder)

    async def run() -> list[tuple[float, str | None]]:
        await cache.open()
        a = await cache.embed([p["cached"] for p in pairs])
        b = await cache.embed([p["new"] for p in pairs])
        sims = (a * b).sum(axis=1)
        out = [(float(s), await cache.check(p["cached"], p["new"]))
               for p, s in zip(pairs, sims)]
        cache.close()
        return out
    return asyncio.run(run())


def precision_recall(pairs: list[dict[str, Any]], scores: list[tuple[float, str | None]],
                     threshold: float, verified: bool) -> dict[str, Any]:
    """Precision, recall and the counts behind them at `threshold`."""
    tp = fp = fn = 0
    rejected: dict[str, int] = {}
    missed_by_category: dict[str, int] = {}
    for p, (sim, reason) in zip(pairs, scores):
        candidate = sim >= threshold
        if candidate and verified and reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
        hit = candidate and (not verified or reason is None)
        if hit and p["should_hit"]:
            tp += 1
        elif hit:
            fp += 1
            missed_by_category[p["category"]] = missed_by_category.get(p["category"], 0) + 1
        elif p["should_hit"]:
            fn += 1
    return {"threshold": threshold, "verified": verified,
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0,
            "hits": tp, "false_hits": fp, "missed": fn, "rejected_by": rejected,
            "false_hits_by_category": missed_by_category}


# --- lookup cost ------------------------------------------------------------------------------
def lookup_cost(encoder: _Encoder, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Milliseconds per probe (median of 50, through the server's SemanticCache) at 1k and
    10k entries: a miss, a hit by vector, an exact hit; the faiss search alone."""
    from peregrine.server.semantic_cache import CacheKey
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for size in (1000, 10000):
        cache = _cache(encoder)

        async def run() -> dict[str, float]:
            store = await cache.open()
            assert store is not None
            # Filler entries (random unit vectors) under the same key, plus real questions:
            # the cached side of the paraphrase pairs, whose other side is then a vector hit.
            vecs = rng.standard_normal((size, store.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            for i, v in enumerate(vecs):
                store.add("k", f"filler {i}", v, "{}")
            para = [p for p in pairs if p["category"] == "paraphrase"]
            stored = sorted({p["cached"] for p in para})
            payload = json.dumps({"text": "x", "token_ids": [1], "finish_reason": "stop",
                                  "stop_reason": None, "seconds": 0.1})
            for q, v in zip(stored, await cache.embed(stored)):
                store.add("k", q, v, payload)
            reworded = [p["new"] for p in para if p["new"] not in stored]
            times: dict[str, list[float]] = {"miss": [], "vector_hit": [], "exact_hit": [],
                                             "faiss_search": []}
            query_vec = (await cache.embed(stored[:1]))[0]
            for i in range(50):
                for kind, query in (("miss", f"an unrelated question number {i} about tea"),
                                    ("exact_hit", stored[i % len(stored)]),
                                    ("vector_hit", reworded[i % len(reworded)])):
                    t = time.perf_counter()
                    probe = await cache.probe(CacheKey("k", query), None)
                    elapsed = time.perf_counter() - t
                    hit = probe.hit and (probe.similarity == 1.0) == (kind == "exact_hit")
                    if (kind == "miss") != hit:  # a paraphrase the verifier refused: skip
                        times[kind].append(elapsed)
                def timed_search() -> float:  # on the cache's thread, as served
                    t = time.perf_counter()
                    store.search("k", query_vec, 4, 0.8)
                    return time.perf_counter() - t
                times["faiss_search"].append(await cache._run(timed_search))
            return {k: round(statistics.median(v) * 1000, 3) for k, v in times.items()}
        out[str(size)] = asyncio.run(run())
        cache.close()
    return out


# --- the workload -----------------------------------------------------------------------------
def workload(pairs: list[dict[str, Any]], n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (kind, question): 50% new, 30% repeats, 20% rewordings of earlier questions."""
    rng = random.Random(seed)
    n_para, n_rep = n * 20 // 100, n * 30 // 100
    n_new = n - n_para - n_rep
    para = list({p["cached"]: p for p in pairs if p["category"] == "paraphrase"}.values())
    rng.shuffle(para)  # (one rewording per original: a second would count as new)
    para = para[:n_para]
    firsts = [p["cached"] for p in para]
    others = sorted(({p["new"] for p in pairs if not p["should_hit"]} |
                     {p["cached"] for p in pairs}) - set(firsts))
    rng.shuffle(others)
    seq: list[tuple[str, str]] = [("new", q) for q in (firsts + others)[:n_new]]
    rng.shuffle(seq)
    for p in para:  # a rewording goes somewhere after its original
        at = next(i for i, (_, q) in enumerate(seq) if q == p["cached"])
        seq.insert(rng.randint(at + 1, len(seq)), ("reworded", p["new"]))
    for _ in range(n_rep):
        at = rng.randrange(len(seq))
        kind, q = seq[at]
        seq.insert(rng.randint(at + 1, len(seq)), ("repeat", q))
    return seq


def run_workload(seq: list[tuple[str, str]], cache: bool, max_tokens: int,
                 concurrency: int) -> dict[str, Any]:
    """Send `seq` to a fresh server, `concurrency` at a time, in order."""
    import httpx

    from peregrine.config import EngineConfig
    from tests.server.conftest import parse_metrics, serve
    args = ServerArgs(semantic_cache=cache, max_queue_len=256)
    with serve(args, EngineConfig(kv_cache_memory=0.25)) as server:
        with httpx.Client(timeout=300) as warm:  # the first request pays for warm-up
            warm.post(server.api + "/chat/completions", json={
                "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2,
                "temperature": 0, "cache": False})
        cache_of = server.app.state.peregrine.ctx.cache
        deadline = time.monotonic() + 120
        while cache_of is not None and cache_of.storage is None:  # the encoder loads at start
            assert time.monotonic() < deadline, "the cache did not open"
            time.sleep(0.1)
        latencies: list[float] = []
        results: list[tuple[str, str]] = []

        async def one(client: httpx.AsyncClient, kind: str, question: str) -> None:
            t = time.perf_counter()
            r = await client.post("/chat/completions", json={
                "messages": [{"role": "user", "content": question}],
                "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            results.append((kind, r.headers.get("x-cache", "off")))

        async def main() -> float:
            sem = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=server.api, timeout=300) as client:
                async def guarded(kind: str, q: str) -> None:
                    async with sem:
                        await one(client, kind, q)
                t = time.perf_counter()
                await asyncio.gather(*(guarded(kind, q) for kind, q in seq))
                return time.perf_counter() - t
        wall = asyncio.run(main())
        m = parse_metrics(httpx.get(server.url + "/metrics").text)
    return {"cache": cache, "requests": len(seq), "seconds": round(wall, 2),
            "requests_per_s": round(len(seq) / wall, 3),
            "mean_latency_s": round(statistics.mean(latencies), 3),
            "p50_latency_s": round(statistics.median(latencies), 3),
            "hits": sum(x == "hit" for _, x in results),
            "misses": sum(x == "miss" for _, x in results),
            "hits_by_kind": {k: sum(x == "hit" for kind, x in results if kind == k)
                             for k in ("new", "repeat", "reworded")},
            "generated_tokens": m.get("peregrine:generation_tokens_total",
                                      m.get("peregrine:generation_tokens", 0)),
            "lookup_seconds_mean": round(
                m.get("peregrine:semantic_cache_lookup_seconds_sum", 0) /
                max(m.get("peregrine:semantic_cache_lookup_seconds_count", 0), 1), 5)}


# --- the machine ------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, core count and the SIMD flags that matter (AVX2, AVX-512)."""
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    import faiss
    return {"cpu": model, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "faiss": faiss.__version__, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--skip-workload", action="store_true")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    os.environ.setdefault("TMPDIR", tempfile.gettempdir())
    pairs = load_pairs()
    encoder = _Encoder()
    scores = score_pairs(pairs, encoder)
    default = ServerArgs().semantic_cache_threshold
    quality = {"pairs": len(pairs),
               "categories": {c: sum(p["category"] == c for p in pairs)
                              for c in dict.fromkeys(p["category"] for p in pairs)},
               "default": [precision_recall(pairs, scores, default, v) for v in (True, False)],
               "sweep": [precision_recall(pairs, scores, t, v) for t in SWEEP
                         for v in (True, False)]}
    print(f"labeled set: {len(pairs)} pairs {quality['categories']}")
    print(f"{'threshold':>9} {'verifier':>8} {'precision':>9} {'recall':>6} {'false hits':>10}")
    for r in quality["sweep"]:
        print(f"{r['threshold']:>9.2f} {'on' if r['verified'] else 'off':>8} "
              f"{r['precision']:>9.3f} {r['recall']:>6.3f} {r['false_hits']:>10}")
    cost = lookup_cost(encoder, pairs)
    print("lookup cost, ms (median):", json.dumps(cost))
    result: dict[str, Any] = {"machine": machine(), "quality": quality, "lookup_ms": cost,
                              "command": "python scripts/bench_semantic_cache.py " +
                              " ".join(sys.argv[1:])}
    if not a.skip_workload:
        seq = workload(pairs, a.requests)
        runs = [{"concurrency": n, **run_workload(seq, c, a.max_tokens, n)}
                for n in a.concurrency for c in (False, True)]
        result["workload"] = {"mix": {k: sum(x == k for x, _ in seq)
                                      for k in ("new", "repeat", "reworded")},
                              "max_tokens": a.max_tokens, "runs": runs}
        for r in runs:
            print(f"workload, {r['concurrency']} at a time, cache {'on ' if r['cache'] else 'off'}"
                  f": {r['requests_per_s']} req/s, mean latency {r['mean_latency_s']}s, "
                  f"hits {r['hits']}, lookup {r['lookup_seconds_mean'] * 1000:.1f} ms")
    print("machine:", json.dumps(result["machine"]))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print("saved", a.out)


if __name__ == "__main__":
    main()
