"""The shape of saved results: one dict per measured run, suites of runs, ratios, JSON I/O."""

from __future__ import annotations

import json
import os
from typing import Any

from peregrine.bench.datasets import BenchRequest, workload_summary
from peregrine.bench.phases import PhaseAccounting
from peregrine.bench.roofline import DevicePeak, ModelCost


def throughput_run(*, engine: str, label: str, settings: dict[str, Any],
                   requests: list[BenchRequest], output_tokens: int, wall_s: float,
                   phases: PhaseAccounting, peak: DevicePeak, cost: ModelCost,
                   generated_tokens: int | None = None, **extra: Any) -> dict[str, Any]:
    """One offline throughput measurement. `output_tokens` are the tokens the workload asked
    for and got; `generated_tokens` (when larger) also counts tokens an engine computed and
    threw away (a static batch runs every member to the longest one's length)."""
    prompt_tokens = sum(r.prompt_len for r in requests)
    return {
        "engine": engine, "label": label, "settings": settings,
        "num_requests": len(requests), "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "total_tokens": prompt_tokens + output_tokens,
        "generated_tokens": output_tokens if generated_tokens is None else generated_tokens,
        "wall_s": wall_s,
        "requests_per_s": len(requests) / wall_s,
        "output_tokens_per_s": output_tokens / wall_s,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
        **phases.summary(peak),
        "cost_model": {"weight_bytes_per_forward": cost.weight_bytes,
                       "kv_bytes_per_token": cost.kv_bytes_per_token,
                       "flops_per_token": 2 * (cost.layer_params + cost.head_params)},
        **extra,
    }


def suite(kind: str, runs: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A saved result file: several runs of one kind plus what they share (workload,
    peak, environment), with each run's ratios to the first."""
    return {"kind": kind, **fields, "runs": runs, "ratios": ratios(kind, runs)}


RATIO_METRICS = {
    "throughput": ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s"),
    "serve": ("output_throughput", "request_throughput"),
}


def ratios(kind: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's key metrics divided by the first (successful) run's."""
    keys = RATIO_METRICS.get(kind, ())
    ok = [r for r in runs if not r.get("error")]
    if not ok or not keys:
        return []
    base = ok[0]
    out = []
    for r in runs:
        row: dict[str, Any] = {"label": r.get("label"), "baseline": base.get("label")}
        for k in keys:
            row[k] = (r[k] / base[k]) if not r.get("error") and base.get(k) else None
        out.append(row)
    return out


def workload_fields(requests: list[BenchRequest], source: dict[str, Any]) -> dict[str, Any]:
    """How a workload was made, and what it came to."""
    return {**source, **workload_summary(requests)}


def save_json(data: dict[str, Any], path: str) -> None:
    """Write a result file (creating its folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")


def load_json(path: str) -> dict[str, Any]:
    """Read a result file."""
    with open(path) as f:
        return json.load(f)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2g}"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
