"""PNG plots of saved results (matplotlib, no display needed)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def throughput_bars(result: dict[str, Any], out_dir: str, name: str) -> str:
    """Output and total tokens/s of each run, side by side, with the ratio to the first."""
    plt = _pyplot()
    runs = [r for r in result["runs"] if not r.get("error")]
    labels = [r["label"].replace(" (", "\n(") for r in runs]
    out = [r["output_tokens_per_s"] for r in runs]
    total = [r["total_tokens_per_s"] for r in runs]
    x = np.arange(len(runs))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(runs)), 4.5))
    ax.bar(x - 0.2, out, 0.4, label="output tokens/s")
    ax.bar(x + 0.2, total, 0.4, label="total (prompt + output) tokens/s")
    for i, v in enumerate(out):
        ax.annotate(f"{v:.0f}\n({v / out[0]:.2f}x)", (x[i] - 0.2, v), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("tokens / s")
    w = result.get("workload") or {}
    ax.set_title(f"Offline throughput, {w.get('num_requests', '?')} requests "
                 f"({(result.get('env') or {}).get('threads', '?')} CPU threads)")
    ax.legend(fontsize=8)
    ax.margins(y=0.2)
    return _save(fig, out_dir, name)


def serve_curves(result: dict[str, Any], out_dir: str, prefix: str) -> list[str]:
    """Throughput and latency against load, and throughput against latency, per server."""
    plt = _pyplot()
    by_server: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        if not run.get("error"):
            by_server.setdefault(run["server"], []).append(run)
    if not by_server:
        return []
    sweep_key = "max_concurrency" if any(r.get("max_concurrency") for runs in
                                         by_server.values() for r in runs) else "request_rate"
    xlabel = "concurrent streams" if sweep_key == "max_concurrency" else "request rate (req/s)"
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for server, runs in by_server.items():
        runs = sorted(runs, key=lambda r: _load_value(r[sweep_key]))
        xs = _x_positions(runs, sweep_key)
        axes[0].plot(xs, [r["output_throughput"] for r in runs], "o-", label=server)
        axes[1].plot(xs, [r["ttft_ms"]["median"] for r in runs], "o-", label=f"{server} median")
        axes[1].plot(xs, [r["ttft_ms"]["p99"] for r in runs], "x--", label=f"{server} p99")
        axes[2].plot(xs, [r["tpot_ms"]["median"] for r in runs], "o-", label=f"{server} median")
        axes[2].plot(xs, [r["tpot_ms"]["p99"] for r in runs], "x--", label=f"{server} p99")
    for ax, title, ylabel in zip(axes, ("Output throughput", "Time to first token",
                                        "Time per output token"),
                                 ("tokens / s", "ms", "ms")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    paths.append(_save(fig, out_dir, f"{prefix}_vs_load.png"))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for server, runs in by_server.items():
        runs = sorted(runs, key=lambda r: _load_value(r[sweep_key]))
        ax.plot([r["tpot_ms"]["median"] for r in runs], [r["output_throughput"] for r in runs],
                "o-", label=server)
        for r in runs:
            ax.annotate(str(r[sweep_key]), (r["tpot_ms"]["median"], r["output_throughput"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("median TPOT (ms)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Throughput vs latency (points: {xlabel})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir, f"{prefix}_throughput_latency.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for server, runs in by_server.items():
        for r in sorted(runs, key=lambda r: _load_value(r[sweep_key])):
            for ax, key in zip(axes, ("ttft_ms", "e2el_ms")):
                values = np.sort(r["per_request"][key])
                if len(values):
                    ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                            label=f"{server}, {r[sweep_key]}")
    for ax, title in zip(axes, ("TTFT CDF", "End-to-end latency CDF")):
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir, f"{prefix}_latency_cdf.png"))
    return paths


def latency_plot(result: dict[str, Any], out_dir: str, name: str) -> str:
    """TTFT by prompt length and decode tokens/s by batch size."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ttft = result["ttft"]
    axes[0].plot([t["prompt_len"] for t in ttft], [t["ttft_ms"]["median"] for t in ttft], "o-")
    axes[0].set_xlabel("prompt tokens")
    axes[0].set_ylabel("median TTFT (ms)")
    axes[0].set_title("Time to first token (one request)")
    dec = result["decode"]
    axes[1].plot([d["batch_size"] for d in dec], [d["tokens_per_s"] for d in dec], "o-",
                 label="all sequences")
    axes[1].plot([d["batch_size"] for d in dec], [d["tokens_per_s_per_seq"] for d in dec],
                 "x--", label="per sequence")
    axes[1].set_xlabel("batch size")
    axes[1].set_ylabel("decode tokens / s")
    axes[1].set_title("Decode speed by batch size")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, name)


def _load_value(v: Any) -> float:
    return float("inf") if v in (None, "inf") else float(v)


def _x_positions(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Sweep values as x positions; inf (all at once) sits at twice the largest finite one."""
    values = [_load_value(r[key]) for r in runs]
    finite = [v for v in values if v != float("inf")]
    top = 2 * max(finite) if finite else 1.0
    return [top if v == float("inf") else v for v in values]


def plot_result(result: dict[str, Any], out_dir: str, stem: str) -> list[str]:
    """Every plot a saved result supports; the PNG paths written."""
    kind = result.get("kind")
    if kind == "throughput":
        return [throughput_bars(result, out_dir, f"{stem}.png")]
    if kind == "serve":
        return serve_curves(result, out_dir, stem)
    if kind == "latency":
        return [latency_plot(result, out_dir, f"{stem}.png")]
    raise ValueError(f"unknown result kind {kind!r}")
