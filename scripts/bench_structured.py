"""What structured outputs cost: decode throughput with and without grammar masks.

    .venv/bin/python scripts/bench_structured.py [--batches 8,32] [--max-tokens 64]

Runs the same batch of chat requests (greedy) unconstrained and under a JSON constraint
(any JSON object, and a JSON schema), and reports output tokens/s and the time per
constrained step spent filling and applying the bitmask. Unconstrained rows
use ignore_eos so they run all --max-tokens; constrained ones stop when the JSON is
complete, so compare tokens/s, not wall time. Writes JSON and a markdown table to --out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from peregrine import LLM, SamplingParams
from peregrine.structured import StructuredOutputs

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16},
                "maxItems": 4}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}
CASES = {
    "none": None,
    "json_object": StructuredOutputs(json_object=True),
    "json_schema": StructuredOutputs(json=SCHEMA),
}
TOPICS = ["a teacher", "a pilot", "a chef", "a painter", "a farmer", "a doctor", "a poet",
          "a sailor"]


def run(llm: LLM, batch: int, case: str, max_tokens: int) -> dict:
    """One timed batch; returns tokens, wall time and mask times."""
    masker = llm.engine.runner.masker
    masker.times = type(masker.times)()
    spec = CASES[case]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, structured=spec,
                            ignore_eos=spec is None)
    convs = [[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} (#{i}) as "
               "JSON with name, age and hobbies."}] for i in range(batch)]
    steps0 = llm.engine.num_steps
    t0 = time.perf_counter()
    outs = llm.chat(convs, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = None
    if spec is not None:
        valid = sum(_parses(o.outputs[0].text) for o in outs) / batch
    t = masker.times
    per_step = (lambda s: 1e3 * s / t.steps) if t.steps else (lambda s: 0.0)
    return {"batch": batch, "case": case, "output_tokens": tokens,
            "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "engine_steps": llm.engine.num_steps - steps0, "masked_steps": t.steps,
            "fill_ms_per_step": per_step(t.fill_s), "apply_ms_per_step": per_step(t.apply_s), "json_parse_rate": valid,
            "finish_stop": sum(o.outputs[0].finish_reason == "stop" for o in outs)}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs per point")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cases", default=",".join(CASES), help="constraints to run")
    ap.add_argument("--out", default="docs/bench-results/structured")
    ns = ap.parse_args()
    llm = LLM(device=ns.device, kv_cache_memory=1.0, num_threads=ns.threads)
    llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=4))  # warm up
    for spec in CASES.values():
        if spec is not None:  # compile once, outside the timings
            llm.engine.add_request("warm", "x", SamplingParams(max_tokens=1, structured=spec))
            llm.engine.abort_request("warm")
    rows = []
    for batch in (int(b) for b in ns.batches.split(",")):
        for case in ns.cases.split(","):
            best = max((run(llm, batch, case, ns.max_tokens) for _ in range(ns.repeats)),
                       key=lambda r: r["output_tokens_per_s"])
            rows.append(best)
            print(_line(best), flush=True)
    os.makedirs(ns.out, exist_ok=True)
    meta = {"config": {k: str(v) for k, v in dataclasses.asdict(llm.config).items()},
            "max_tokens": ns.max_tokens, "repeats": ns.repeats,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count()}
    with open(os.path.join(ns.out, "structured.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    table = [HEADER, SEPARATOR] + [_line(r) for r in rows]
    with open(os.path.join(ns.out, "structured.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


HEADER = "| batch | constraint | tokens | tok/s | fill ms/step | apply ms/step | JSON parses |"
SEPARATOR = "|---|---|---|---|---|---|---|"


def _line(r: dict) -> str:
    parses = "-" if r["json_parse_rate"] is None else f"{100 * r['json_parse_rate']:.0f}%"
    return (f"| {r['batch']} | {r['case']} | {r['output_tokens']} | "
            f"{r['output_tokens_per_s']:.1f} | {r['fill_ms_per_step']:.3f} | "
            f"{r['apply_ms_per_step']:.3f} | {parses} |")


if __name__ == "__main__":
    main()
