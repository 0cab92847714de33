"""Decode speed of SmolLM2-135M (float32) on one process and split over two: tensor parallel
(TP=2) and pipeline parallel (PP=2), at batch 1 and 8, with where a step's time goes.
With --moe, the Mixtral-shaped dummy model of scripts/bench_moe.py (hidden 512, 4 layers,
8 experts of width 1024, top-2) on one process, on two with every expert split by columns
and on two with expert parallelism (4 whole experts per rank).

    .venv/bin/python scripts/bench_tp.py [--tokens 32] [--out docs/bench-results/tp.json]
    .venv/bin/python scripts/bench_tp.py --moe --repeats 3   # docs/bench-results/tp_moe.json

For each configuration an engine is built once; each batch size then generates --tokens
greedy tokens per sequence (ignore_eos) after a warm-up, and only the pure decode steps
(every sequence one token) are timed, --repeats times with the fastest kept. For the
parallel engines the driver's and each worker's timing table
(peregrine/distributed/executor.py) splits a step into compute,
communication (inside all-reduce / gather / send / recv, waiting for the other rank
included) and step messages (building and sending, or decoding, the per-step message);
"engine" is what the driver spends outside the forward pass (scheduling, sampling,
detokenizing); "collectives" counts the driver's collectives and transfers per decode step
(every rank makes the same ones). Prints a markdown table and saves it with the machine
and the load average as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peregrine import LLM, SamplingParams  # noqa: E402
from peregrine.bench.env import environment  # noqa: E402
from peregrine.distributed.worker import BUSY, COMM, MESSAGE, STEPS  # noqa: E402

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("TP=1, 1 thread", dict(num_threads=1)),
    ("TP=1, 2 threads", dict(num_threads=2)),
    ("TP=2 (1 thread per rank)", dict(tensor_parallel_size=2)),
    ("PP=2 (1 thread per rank)", dict(pipeline_parallel_size=2)),
]
MOE_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("MoE TP=1, 1 thread", dict(num_threads=1)),
    ("MoE TP=2, experts split", dict(tensor_parallel_size=2)),
    ("MoE TP=2, expert parallel", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
]
PROMPT = [504, 3174, 253, 655, 28, 281, 253, 1744, 1623, 2004, 28, 665, 9, 4138, 7, 3]


def measure(llm: LLM, batch: int, tokens: int) -> dict[str, Any]:
    """Decode steps of `batch` sequences generating `tokens` each: wall time per step, and
    per rank the time split (parallel engines)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):  # distinct first tokens: no prefix-cache sharing between them
        engine.add_request(None, {"prompt_token_ids": [100 + i] + PROMPT}, params)
    executor = engine.executor
    walls: list[float] = []
    before = after = None
    calls = 0
    while engine.has_unfinished_requests():
        snapshot = executor.timings.clone() if executor is not None else None
        calls0 = executor.groups.comm_calls if executor is not None else 0
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        if engine.last_step_tokens == len(engine.scheduler.running) == batch:
            walls.append(wall)
            if executor is not None:
                before = snapshot if before is None else before
                after = executor.timings.clone()
                calls += executor.groups.comm_calls - calls0
    step = sum(walls) / len(walls)
    out: dict[str, Any] = {"batch": batch, "decode_steps": len(walls), "step_ms": step * 1e3,
                           "tok_per_s": batch / step}
    if executor is not None:
        delta = (after - before).tolist()
        ranks = []
        for r, row in enumerate(delta):
            n = max(row[STEPS], 1)
            busy, comm, msg = row[BUSY] / n, row[COMM] / n, row[MESSAGE] / n
            ranks.append({"rank": r, "busy_ms": busy * 1e3, "compute_ms": (busy - comm - msg)
                          * 1e3, "comm_ms": comm * 1e3, "message_ms": msg * 1e3})
        out["ranks"] = ranks
        out["engine_ms"] = (step - delta[0][BUSY] / max(delta[0][STEPS], 1)) * 1e3
        out["collectives_per_step"] = calls / len(walls)
        out["ms_per_collective"] = ranks[0]["comm_ms"] / max(calls / len(walls), 1)
    return out


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the shortest decode step (on a shared machine the least disturbed),
    with every run's tok/s beside it."""
    best = dict(min(runs, key=lambda m: m["step_ms"]))
    best["tok_per_s_runs"] = [m["tok_per_s"] for m in runs]
    return best


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table: one row per configuration and batch size."""
    lines = ["| configuration | batch | decode tok/s | step ms | driver compute ms | "
             "comm ms | collectives (ms each) | step message ms | engine ms | "
             "worker compute / comm ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for res in results:
        for m in res["runs"]:
            if "ranks" in m:
                d = m["ranks"][0]
                workers = "; ".join(f"rank {w['rank']}: {w['compute_ms']:.1f} / "
                                    f"{w['comm_ms']:.1f}" for w in m["ranks"][1:])
                cells = [f"{d['compute_ms']:.1f}", f"{d['comm_ms']:.1f}",
                         f"{m['collectives_per_step']:.0f} ({m['ms_per_collective']:.2f})",
                         f"{d['message_ms']:.2f}", f"{m['engine_ms']:.1f}", workers]
            else:
                cells = ["", "", "", "", "", ""]
            lines.append(f"| {res['name']} | {m['batch']} | {m['tok_per_s']:.1f} | "
                         f"{m['step_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per sequence")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure each batch size this many times and keep the fastest")
    ap.add_argument("--moe", action="store_true",
                    help="the Mixtral-shaped dummy model: experts split vs expert parallel")
    ap.add_argument("--out", default=None,
                    help="JSON written here (docs/bench-results/tp.json, tp_moe.json)")
    args = ap.parse_args()
    out = args.out or f"docs/bench-results/{'tp_moe' if args.moe else 'tp'}.json"
    env = environment(argv=["scripts/bench_tp.py", *sys.argv[1:]])
    env["command"] = " ".join([".venv/bin/python", "scripts/bench_tp.py", *sys.argv[1:]])
    model: dict[str, Any] = {}
    if args.moe:
        from scripts.bench_moe import configs
        path = tempfile.mkdtemp(prefix="bench_tp_moe_")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(configs(4)["moe"], f)
        model = dict(model=path, load_format="dummy", dtype="float32")
    results = []
    for name, opts in MOE_CONFIGS if args.moe else CONFIGS:
        t0 = time.perf_counter()
        llm = LLM(quantization="none", kv_cache_memory=0.5, **model, **opts)
        start = time.perf_counter() - t0
        measure(llm, 2, 4)  # warm-up: allocator, thread pools, first collectives
        runs = [fastest([measure(llm, int(b), args.tokens) for _ in range(args.repeats)])
                for b in args.batches.split(",")]
        results.append({"name": name, "options": opts, "start_s": start, "runs": runs,
                        "torch_threads": torch.get_num_threads()})
        llm.shutdown()
        print(f"{name}: started in {start:.1f} s; " + ", ".join(
            f"batch {m['batch']}: {m['tok_per_s']:.1f} tok/s" for m in runs), flush=True)
    env["load_average_end"] = os.getloadavg()
    md = table(results)
    print(md)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"kind": "moe_tensor_expert_parallel" if args.moe
                   else "tensor_pipeline_parallel", "results": results, "markdown": md,
                   "env": env}, f, indent=1)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
