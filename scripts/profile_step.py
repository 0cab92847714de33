"""Where one decode step's time goes: linears, attention, LM head, sampler, the rest (Python).

Runs B streams of greedy decoding on the embedded SmolLM2 and times each part of every step
by wrapping it, for the eager module path (`--enforce-eager`, the reference) and the default
path (the fused C++ decode step), side by side. Prints a table and saves JSON.

    .venv/bin/python scripts/profile_step.py --batch 1,32 --threads 2 \
        --output docs/bench-results/step_profile.json
    .venv/bin/python scripts/profile_step.py --model gemma-3-1b --load-format dummy \
        --quantization int4 --batch 1 --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from peregrine import LLM, SamplingParams
from peregrine.bench.env import environment


def _timed(acc: dict[str, float], key: str, fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - t
    return wrapper


class _TimedDecoder:
    """Stands in for the C++ decoder object (its methods cannot be wrapped in place)."""

    def __init__(self, decoder: Any, acc: dict[str, float]) -> None:
        self.forward = _timed(acc, "fused layers", decoder.forward)


class Profiled:
    """One engine (eager modules or the fused step) with every part of its step timed."""

    def __init__(self, eager: bool, threads: int, **model: Any) -> None:
        llm = LLM(enforce_eager=eager, num_threads=threads, **model)
        runner = llm.engine.runner
        self.acc: dict[str, float] = defaultdict(float)
        net = runner.model
        if runner.fused is not None:
            runner.fused.decoder = _TimedDecoder(runner.fused.decoder, self.acc)
        for layer in net.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                lin.forward = _timed(self.acc, "linears", lin.forward)
        backend = net.layers[0].self_attn.backend  # one object shared by every layer
        backend.forward = _timed(self.acc, "attention", backend.forward)
        net.compute_logits = _timed(self.acc, "lm head", net.compute_logits)
        runner.sampler = _timed(self.acc, "sampler", runner.sampler)
        self.engine = llm.engine
        self.runs = 0

    def run(self, batch: int, steps: int) -> dict[str, float]:
        """Milliseconds per decode step of each part, the mean over `steps` steps of
        `batch` streams."""
        engine, acc = self.engine, self.acc
        params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
        ids = [f"r{self.runs}-{i}" for i in range(batch)]
        self.runs += 1
        for i, rid in enumerate(ids):
            engine.add_request(rid, [1 + (7 * i + j) % 5000 for j in range(32)], params)
        while any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        acc.clear()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - t
        for rid in ids:
            engine.abort_request(rid)
        out = {k: v / steps * 1e3 for k, v in acc.items()}
        out["sampler"] = out.get("sampler", 0.0) - out.get("lm head", 0.0)  # it calls the head
        out["python and the rest"] = total / steps * 1e3 - sum(out.values())
        out["step"] = total / steps * 1e3
        out["tok/s"] = batch * steps / total
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,32", help="comma list of concurrent streams")
    p.add_argument("--steps", type=int, default=48, help="decode steps measured")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of --steps per path, alternating; the fastest counts")
    p.add_argument("--model", default=None, help="a model or shipped config (default: the "
                   "embedded SmolLM2)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--output", default=None, help="save the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engines = {eager: Profiled(eager, args.threads, model=args.model,
                               load_format=args.load_format, quantization=args.quantization)
               for eager in (True, False)}
    rows = []
    for b in (int(v) for v in args.batch.split(",")):
        best: dict[bool, dict[str, float]] = {}
        for _ in range(args.repeats):  # alternating, so a change of load hits both paths
            for eager, prof in engines.items():
                r = prof.run(b, args.steps)
                if eager not in best or r["step"] < best[eager]["step"]:
                    best[eager] = r
        for eager, r in best.items():
            rows.append({"batch": b, "path": "eager modules" if eager else "fused (default)",
                         **{k: round(v, 3) for k, v in r.items()}})
    keys = ["linears", "attention", "fused layers", "lm head", "sampler",
            "python and the rest", "step", "tok/s"]
    print("| streams | path | " + " | ".join(f"{k} (ms)" if k != "tok/s" else k for k in keys)
          + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['batch']} | {r['path']} | "
              + " | ".join(f"{r.get(k, 0):.2f}" if k != "tok/s" else f"{r[k]:.1f}" for k in keys)
              + " |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": environment(args.threads), "threads": args.threads, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
