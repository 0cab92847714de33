"""`peregrine bench spec`: decode speed with and without speculative decoding, side by side.

Two workloads, greedy: "copy" (rewrite, summarize or edit a given text or code: the output
repeats much of the prompt, which n-gram lookup exploits) and "chat" (open questions, where
the output seldom repeats the prompt). Each proposer runs on the same requests; the table
gives decode tokens/s, the ratio to no speculation, the acceptance counters and whether the
outputs were token-identical to the baseline's (they must be: greedy is exact)."""

from __future__ import annotations

import time
from typing import Any

from peregrine.config import EngineConfig
from peregrine.llm import LLM
from peregrine.quantization.corpus import eval_text
from peregrine.sampling_params import SamplingParams

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''

CHAT = ["What is the capital of France, and what is it known for?",
        "Give me three tips for sleeping better.",
        "Explain what a black hole is to a ten-year-old.",
        "Write a short poem about autumn leaves.",
        "What are the benefits of drinking water?",
        "How do I make a good cup of tea?",
        "Why is the sky blue?",
        "Suggest a name for a friendly robot and explain why."]


def copy_prompts() -> list[str]:
    """Rewrite / summarize / edit tasks over paragraphs of the bundled corpus, and code
    edits of one function."""
    paragraphs = [p.strip() for p in eval_text().split("\n\n") if 300 < len(p.strip()) < 700]
    texts = paragraphs[:5]
    return ([f"Repeat the following text exactly, correcting any spelling mistakes:\n\n{t}"
             for t in texts[:3]]
            + [f"Summarize the following text, quoting its key sentences:\n\n{t}"
               for t in texts[3:5]]
            + [f"Rename the variable `total` to `running_sum` in this code and return the "
               f"whole function:\n\n{CODE}",
               f"Add type hints to this function and return the whole function:\n\n{CODE}",
               f"Rewrite this function with a docstring example, keeping the code:\n\n{CODE}"])


WORKLOADS = {"copy": copy_prompts, "chat": lambda: list(CHAT)}


def run_spec(base: EngineConfig, proposers: list[str], workloads: list[str], max_tokens: int,
             batch_sizes: list[int], k: int, num_requests: int | None = None
             ) -> dict[str, Any]:
    """Every (workload, batch size, proposer) point; proposer "none" is the baseline."""
    runs = []
    for spec in ["none", *proposers]:
        kwargs = {**vars(base), "speculative": None if spec == "none" else spec,
                  "num_speculative_tokens": k}
        llm = LLM(**kwargs)
        llm.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_tokens=4))  # warm
        for workload in workloads:
            prompts = WORKLOADS[workload]()[:num_requests]
            chats = [[{"role": "user", "content": p}] for p in prompts]
            for bs in batch_sizes:
                runs.append(_point(llm, spec, workload, chats, bs, max_tokens))
    _compare(runs)
    return {"kind": "spec", "runs": runs, "max_tokens": max_tokens,
            "num_speculative_tokens": k}


def _point(llm: LLM, spec: str, workload: str, chats: list, batch: int,
           max_tokens: int) -> dict[str, Any]:
    """Run the chats `batch` at a time; decode speed counts tokens after each first one."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine = llm.engine
    before = _counters(engine)
    outputs, decode_s, wall = [], 0.0, 0.0
    for i in range(0, len(chats), batch):
        t0 = time.perf_counter()
        outs = llm.chat(chats[i:i + batch], params)
        wall += time.perf_counter() - t0
        # The group decodes from its first first-token to its last last-token.
        decode_s += (max(o.metrics.last_token_time for o in outs)
                     - min(o.metrics.first_token_time for o in outs))
        outputs += [o.outputs[0].token_ids for o in outs]
    after = _counters(engine)
    tokens = sum(len(t) for t in outputs)
    decode_tokens = tokens - len(outputs)
    drafts = after["drafts"] - before["drafts"]
    accepted = after["accepted"] - before["accepted"]
    verifications = after["verifications"] - before["verifications"]
    per_pos = [a - b for a, b in zip(after["per_position"], before["per_position"]
                                     + [0] * len(after["per_position"]))]
    proposed = [a - b for a, b in zip(after["proposed"], before["proposed"]
                                      + [0] * len(after["proposed"]))]
    return {"proposer": spec, "workload": workload, "batch": batch, "requests": len(chats),
            "output_tokens": tokens, "wall_s": wall,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s else None,
            "output_tokens_per_s": tokens / wall,
            "draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None,
            "mean_accepted_length": 1 + accepted / verifications if verifications else None,
            "per_position_acceptance": [a / p if p else None for a, p in zip(per_pos, proposed)],
            "token_ids": outputs}


def _counters(engine: Any) -> dict[str, Any]:
    s = engine.get_stats().spec_decode
    if s is None:
        return {"drafts": 0, "accepted": 0, "verifications": 0, "per_position": [],
                "proposed": []}
    return {"drafts": s.num_draft_tokens, "accepted": s.num_accepted_tokens,
            "verifications": s.num_verifications, "per_position": list(s.accepted_per_position),
            "proposed": list(s.proposed_per_position)}


def _compare(runs: list[dict[str, Any]]) -> None:
    """Speed-up over, and token identity with, the baseline point of the same workload."""
    base = {(r["workload"], r["batch"]): r for r in runs if r["proposer"] == "none"}
    for r in runs:
        b = base[(r["workload"], r["batch"])]
        r["identical_to_baseline"] = r["token_ids"] == b["token_ids"]
        ours, theirs = r["decode_tokens_per_s"], b["decode_tokens_per_s"]
        r["decode_speedup"] = ours / theirs if ours and theirs else None
    for r in runs:
        del r["token_ids"]


def spec_table(result: dict[str, Any]) -> str:
    """One row per point."""
    from peregrine.bench.results import table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"
    rows = [[r["workload"], r["batch"], r["proposer"], r["decode_tokens_per_s"],
             "-" if r["decode_speedup"] is None else f"{r['decode_speedup']:.2f}x",
             pct(r["acceptance_rate"]),
             "-" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}",
             " / ".join(pct(x) for x in r["per_position_acceptance"]) or "-",
             "yes" if r["identical_to_baseline"] else "NO"] for r in result["runs"]]
    header = ["workload", "streams", "proposer", "decode tok/s", "vs none", "accepted",
              "tokens / step", "acceptance by position", "same output"]
    return table(header, rows)
