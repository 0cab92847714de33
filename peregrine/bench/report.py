"""Markdown tables of saved results, and regenerating the tables in docs/benchmarks.md."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from peregrine.bench.energy import energy_table
from peregrine.bench.results import load_json, table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def throughput_table(result: dict[str, Any]) -> str:
    """One row per run: throughput, per-phase speed and utilization, ratio to the first."""
    ratios = result.get("ratios") or [{}] * len(result["runs"])  # one per run, in order
    rows = []
    for run, ratio in zip(result["runs"], ratios):
        if run.get("error"):
            rows.append([run["label"], "", f"not run: {run['error']}"] + [""] * 9)
            continue
        pre, dec = run["prefill"], run["decode"]
        rows.append([run["label"], run.get("settings", {}).get("threads"),
                     run["output_tokens_per_s"], run["total_tokens_per_s"],
                     run["requests_per_s"], run["wall_s"], pre["tokens_per_s"],
                     _pct(pre["mfu"]), dec["tokens_per_s"], _pct(dec["mbu"]),
                     _pct(run["steps"]["mixed_time_fraction"]),
                     _ratio(ratio.get("output_tokens_per_s"))])
    header = ["engine", "threads", "output tok/s", "total tok/s", "req/s", "wall s",
              "prefill tok/s", "prefill MFU", "decode tok/s", "decode MBU",
              "time in mixed steps", "output tok/s vs first"]
    energy = energy_table(result["runs"])
    return table(header, rows) + (f"\n\nEnergy and cost:\n\n{energy}" if energy else "")


def latency_tables(result: dict[str, Any]) -> str:
    """TTFT by prompt length and decode speed by batch size."""
    ttft = table(["prompt tokens", "TTFT median ms", "TTFT p90 ms", "prefill tok/s",
                  "prefill MFU", "steps"],
                 [[t["prompt_len"], t["ttft_ms"]["median"], t["ttft_ms"]["p90"],
                   t["prefill_tokens_per_s"], _pct(t["prefill_mfu"]), t["steps_per_request"]]
                  for t in result["ttft"]])
    dec = table(["batch size", "TPOT median ms", "TPOT p90 ms", "tok/s (all)",
                 "tok/s per sequence", "decode MBU"],
                [[d["batch_size"], d["tpot_ms"]["median"], d["tpot_ms"]["p90"],
                  d["tokens_per_s"], d["tokens_per_s_per_seq"], _pct(d["mbu"])]
                 for d in result["decode"]])
    energy = energy_table([{**d, "label": f"batch {d['batch_size']} (prefill included)"}
                           for d in result["decode"]])
    return ttft + "\n\n" + dec + (f"\n\nEnergy of each decode run:\n\n{energy}"
                                   if energy else "")


def serve_table(result: dict[str, Any]) -> str:
    """One row per (server, load) point."""
    rows = []
    env_threads = (result.get("env") or {}).get("threads")
    for run in result["runs"]:
        load = _load_label(run)
        threads = run.get("threads", env_threads) if run.get("server") != "server" else None
        if run.get("error"):
            rows.append([run["server"], threads, load, f"not run: {run['error']}"]
                        + [""] * 9)
            continue
        ttft, tpot, itl, e2e = run["ttft_ms"], run["tpot_ms"], run["itl_ms"], run["e2el_ms"]
        good = run.get("goodput", {}).get("request_goodput")
        rows.append([run["server"], threads, load,
                     f"{run['completed']}/{run['completed'] + run['failed']}",
                     run["request_throughput"], run["output_throughput"], ttft["median"],
                     ttft["p99"], tpot["median"], tpot["p99"], itl["median"], e2e["median"],
                     good])
    header = ["server", "threads", "load", "ok", "req/s", "output tok/s", "TTFT median ms",
              "TTFT p99 ms", "TPOT median ms", "TPOT p99 ms", "ITL median ms",
              "E2E median ms", "goodput req/s"]
    return table(header, rows)


def _load_label(run: dict[str, Any]) -> str:
    parts = []
    if run.get("max_concurrency"):
        parts.append(f"{run['max_concurrency']} concurrent")
    rate = run.get("request_rate")
    parts.append("all at once" if rate in (None, "inf", float("inf")) else f"{rate} req/s")
    return ", ".join(parts)


def _parallel_label(env: dict[str, Any]) -> str | None:
    """'tensor parallel 2 x pipeline parallel 1' when the engine ran on several processes
    (', expert parallel' when it split MoE layers by experts)."""
    tp, pp = env.get("tensor_parallel_size", 1), env.get("pipeline_parallel_size", 1)
    if tp * pp == 1:
        return None
    ep = ", expert parallel" if env.get("enable_expert_parallel") else ""
    return f"tensor parallel {tp} x pipeline parallel {pp}{ep}"


def env_line(env: dict[str, Any] | None) -> str:
    """Machine, versions and date in one line."""
    if not env:
        return ""
    flags = "+".join(f.upper() for f in env.get("cpu_flags") or [])
    mem = env.get("memory_gib")
    bits = [f"{env.get('cores')}-core {env.get('cpu')} ({flags})",
            f"{mem:.0f} GiB" if mem else None, f"{env.get('threads')} threads",
            _parallel_label(env),
            f"torch {env.get('torch')}", f"transformers {env.get('transformers')}",
            f"llama-cpp-python {env.get('llama_cpp_python')}" if env.get("llama_cpp_python")
            else None, f"peregrine {env.get('peregrine_commit')}",
            f"load average {', '.join(f'{x:.1f}' for x in env['load_average'])} at start"
            if env.get("load_average") else None, env.get("date")]
    return "Machine: " + "; ".join(b for b in bits if b) + "."


def render(result: dict[str, Any]) -> str:
    """The markdown of a saved result: its command, environment and table(s)."""
    kind = result.get("kind")
    if kind == "throughput":
        body = throughput_table(result)
    elif kind == "latency":
        body = latency_tables(result)
    elif kind == "serve":
        body = serve_table(result)
    elif kind == "spec":
        from peregrine.bench.spec import spec_table
        body = spec_table(result)
    elif kind == "workloads":
        from peregrine.bench.peers.workloads import workloads_table
        body = workloads_table(result)
    else:
        raise ValueError(f"unknown result kind {kind!r}")
    env = result.get("env") or {}
    head = f"```bash\n{env.get('command', '')}\n```\n\n" if env.get("command") else ""
    workload = result.get("workload")
    wl = f"\n\nWorkload: {_workload_line(workload)}" if workload else ""
    return f"{head}{body}{wl}\n\n{env_line(env)}".rstrip() + "\n"


def _workload_line(w: dict[str, Any]) -> str:
    return (f"{w['num_requests']} requests, prompts {w['prompt_len_min']}-"
            f"{w['prompt_len_max']} tokens (mean {w['prompt_len_mean']:.0f}), outputs "
            f"{w['output_len_min']}-{w['output_len_max']} tokens (mean "
            f"{w['output_len_mean']:.0f}), {w.get('dataset', 'random')} dataset, seed "
            f"{w.get('seed')}.")


MARKER = re.compile(r"(<!-- BEGIN bench:(?P<name>[\w.-]+) -->\n).*?(<!-- END bench:(?P=name) -->)",
                    re.S)


def update_doc(doc_path: str, results_dir: str) -> list[str]:
    """Replace each `<!-- BEGIN bench:NAME -->...<!-- END bench:NAME -->` block of the doc
    with the rendering of results_dir/NAME.json; returns the names updated."""
    with open(doc_path) as f:
        text = f.read()
    updated: list[str] = []

    def fill(m: re.Match) -> str:
        path = os.path.join(results_dir, m.group("name") + ".json")
        if not os.path.isfile(path):
            return m.group(0)
        updated.append(m.group("name"))
        return m.group(1) + render(load_json(path)) + m.group(3)

    text = MARKER.sub(fill, text)
    with open(doc_path, "w") as f:
        f.write(text)
    return updated


def result_files(results_dir: str) -> list[str]:
    """The result JSON files in a folder."""
    return sorted(glob.glob(os.path.join(results_dir, "*.json")))
