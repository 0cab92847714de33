"""What tool calling costs per decode step: grammar masks (tool_choice required / named) and
the streaming call parser (auto), at 1 and 32 streams.

    .venv/bin/python scripts/bench_tools.py [--batches 1,32] [--max-tokens 64] [--threads 2]

Each batch of chat requests (greedy, the tools in the prompt as the server puts them) runs
as: `plain` (no tools, ignore_eos: the reference step time), `auto` (tools offered, output
read by the streaming parser), `required` and `named` (output constrained by the forced
JSON schema). Masks are timed inside the engine (fill, apply: ms per constrained step); the
parser is timed by replaying each output token by token through the server's StreamParser,
as a streamed response feeds it (µs per token; x batch = its cost per step, since every
stream gets one token a step). Writes JSON and a markdown table to --out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

from peregrine import LLM, SamplingParams
from peregrine.server import tools as tool_calls
from peregrine.server.protocol import ChatTool, NamedToolChoice
from peregrine.structured import StructuredOutputs

TOOLS = [ChatTool.model_validate(t) for t in [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                       "required": ["timezone"]}}}]]
NAMED = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Seoul"]


def forced(choice: str | NamedToolChoice) -> StructuredOutputs:
    """The constraint the server puts on a forced call (compact JSON)."""
    return StructuredOutputs(json=tool_calls.forced_schema(TOOLS, choice, parallel=False),
                             disable_any_whitespace=True)


CASES: dict[str, tuple[bool, StructuredOutputs | None, str | NamedToolChoice | None]] = {
    # name: (tools in the prompt, constraint, the parser's forced choice)
    "plain": (False, None, None),
    "auto": (True, None, None),
    "required": (True, forced("required"), "required"),
    "named": (True, forced(NAMED), NAMED),
}


def parse_cost(llm: LLM, outs: list, choice: str | NamedToolChoice | None) -> tuple[float, int]:
    """Seconds the streaming parser takes over the outputs fed token by token, and calls."""
    tok = llm.engine.tokenizer
    names = {t.function.name for t in TOOLS}
    seconds, calls = 0.0, 0
    for o in outs:
        ids = o.outputs[0].token_ids
        pieces = [tok.decode(ids[:i + 1]) for i in range(len(ids))]
        parser = tool_calls.StreamParser("hermes", names, choice)
        t0 = time.perf_counter()
        sent = 0
        for i, text in enumerate(pieces):
            parser.feed(text[sent:], i == len(pieces) - 1)
            sent = len(text)
        seconds += time.perf_counter() - t0
        calls += len(parser.calls)
    return seconds, calls


def run(llm: LLM, batch: int, case: str, max_tokens: int) -> dict:
    """One timed batch: tokens/s, mask ms per step, parser µs per token."""
    with_tools, spec, choice = CASES[case]
    masker = llm.engine.runner.masker
    masker.times = type(masker.times)()
    convs = [tool_calls.prepare_messages(
        [{"role": "user", "content": f"What is the weather in {CITIES[i % len(CITIES)]}?"}],
        TOOLS if with_tools else None, knows_tools=False) for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, structured=spec,
                            ignore_eos=case == "plain")
    steps0 = llm.engine.num_steps
    t0 = time.perf_counter()
    outs = llm.chat(convs, params)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    parse_s, calls = parse_cost(llm, outs, choice) if case != "plain" else (0.0, 0)
    t = masker.times
    per_step = (lambda s: 1e3 * s / t.steps) if t.steps else (lambda s: 0.0)
    steps = llm.engine.num_steps - steps0
    return {"batch": batch, "case": case, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "ms_per_step": 1e3 * wall / max(steps, 1),
            "engine_steps": steps, "masked_steps": t.steps,
            "fill_ms_per_step": per_step(t.fill_s), "apply_ms_per_step": per_step(t.apply_s),
            "parser_us_per_token": 1e6 * parse_s / max(tokens, 1),
            "parser_ms_per_step": 1e3 * parse_s / max(tokens, 1) * batch,
            "calls": calls}


HEADER = ("| streams | case | tokens | tok/s | ms/step | mask fill ms/step | mask apply ms/step "
          "| parser µs/token | parser ms/step | calls parsed |")
SEPARATOR = "|---|---|---|---|---|---|---|---|---|---|"


def line(r: dict) -> str:
    return (f"| {r['batch']} | {r['case']} | {r['output_tokens']} | "
            f"{r['output_tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['fill_ms_per_step']:.3f} | {r['apply_ms_per_step']:.3f} | "
            f"{r['parser_us_per_token']:.1f} | {r['parser_ms_per_step']:.3f} | {r['calls']} |")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "?")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f" {f}" in info]
    return f"{model} ({', '.join(isa)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="docs/bench-results/tools")
    ns = ap.parse_args()
    llm = LLM(kv_cache_memory=1.0, num_threads=ns.threads)
    llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=4))  # warm up
    for _, spec, _ in CASES.values():
        if spec is not None:  # compile once, outside the timings
            llm.engine.add_request("warm", "x", SamplingParams(max_tokens=1, structured=spec))
            llm.engine.abort_request("warm")
    rows = []
    for batch in (int(b) for b in ns.batches.split(",")):
        for case in ns.cases.split(","):
            rows.append(run(llm, batch, case, ns.max_tokens))
            print(line(rows[-1]), flush=True)
    os.makedirs(ns.out, exist_ok=True)
    meta = {"config": {k: str(v) for k, v in dataclasses.asdict(llm.config).items()},
            "max_tokens": ns.max_tokens, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(os.path.join(ns.out, "tools.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    table = [HEADER, SEPARATOR] + [line(r) for r in rows]
    with open(os.path.join(ns.out, "tools.md"), "w") as f:
        f.write(f"{meta['cpu']}, {meta['time']}\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
