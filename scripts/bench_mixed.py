"""Mixed precision per layer vs uniform formats: held-out perplexity and decode speed at each size.

    .venv/bin/python scripts/bench_mixed.py [--sensitivity-tokens 256] [--eval-tokens 2048]
    .venv/bin/python scripts/bench_mixed.py --speed-only   # add tok/s to the saved results

Measures every decoder linear's sensitivity of SmolLM2-135M (float weights from the GGUF,
calibration half of the bundled corpus), then quantizes the model uniformly to each
candidate format and mixed at each uniform format's size, and reports bits per weight and
perplexity on the held-out half, and single-stream decode tok/s of each plan (the engine's
decode step: the fused C++ step when every linear is int4/int8, 2 threads). Writes JSON, a
markdown table and the frontier plot (perplexity against bits and against tok/s)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from peregrine.attention_backend import AttentionMetadata, allocate_kv_pool
from peregrine.engine.cpu_decode import fused_decode_runner
from peregrine.models.loader import load_model
from peregrine.quantization.corpus import calibration_text, eval_text
from peregrine.quantization.mixed import (CANDIDATES, LayerStats, apply_plan, format_name,
                                          measure, plan, plan_bits, uniform_bits)
from peregrine.quantization.perplexity import perplexity


def cpu_name() -> str:
    """The CPU model and the ISA extensions that matter here."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "?")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f" {f}" in info]
    return f"{model} ({', '.join(isa)})"


@torch.inference_mode()
def decode_tok_s(net, tokens: int = 96, repeats: int = 3, block_size: int = 16) -> float:
    """Single-stream decode speed of `net` as the engine steps it (fused step where it
    applies, else the modules), LM head and argmax included: best of `repeats`."""
    blocks = -(-(tokens + 1) // block_size)
    pool = allocate_kv_pool(net.config, blocks, block_size, torch.float32, torch.device("cpu"))
    runner = fused_decode_runner(net, pool)
    table = torch.arange(blocks, dtype=torch.int32).unsqueeze(0)
    best = 0.0
    for _ in range(repeats):
        tok = torch.tensor([1])
        t0 = time.perf_counter()
        for t in range(tokens):
            meta = AttentionMetadata(
                query_start_loc=[0, 1], seq_lens=[t + 1], num_decodes=1,
                slot_mapping=torch.tensor([t]), block_tables=table,
                query_start_loc_t=torch.tensor([0, 1], dtype=torch.int32),
                seq_lens_t=torch.tensor([t + 1], dtype=torch.int32))
            pos = torch.tensor([t])
            hidden = (runner.run(tok, pos, meta) if runner is not None
                      else net(tok, pos, meta, pool))
            tok = net.compute_logits(hidden).argmax(-1)
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensitivity-tokens", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default="docs/bench-results/mixed")
    ap.add_argument("--speed-only", action="store_true",
                    help="keep the saved perplexities, (re)measure decode tok/s only")
    ns = ap.parse_args()
    os.makedirs(ns.out, exist_ok=True)
    torch.set_num_threads(2)
    loaded = load_model(None, dtype=torch.float32)
    net, tok = loaded.model, loaded.tokenizer
    calib = tok.encode(calibration_text())[:ns.sensitivity_tokens]
    held_out = tok.encode(eval_text(), add_special_tokens=False)[:ns.eval_tokens]
    cache = os.path.join(ns.out, "sensitivity.json")
    t0 = time.perf_counter()
    if os.path.isfile(cache):
        with open(cache) as f:
            stats = [LayerStats(**s) for s in json.load(f)["stats"]]
    else:
        stats = measure(net, calib, context=ns.sensitivity_tokens)
        with open(cache, "w") as f:
            json.dump({"tokens": len(calib), "stats": [s.__dict__ for s in stats]}, f)
    measure_s = time.perf_counter() - t0
    plans: list[tuple[str, dict[str, str] | None]] = [("float32", None)]
    for fmt in CANDIDATES[:-1]:  # int8 is the top: mixed at its size would be all int8
        name = format_name(fmt)
        plans.append((name, {s.name: name for s in stats}))
        if fmt != CANDIDATES[0]:  # at the smallest size every plan is the uniform one
            plans.append((f"mixed @ {name}", plan(stats, uniform_bits(stats, fmt))))
    plans.append(("int8", {s.name: "int8" for s in stats}))
    saved = {}
    if ns.speed_only:
        with open(os.path.join(ns.out, "mixed.json")) as f:
            saved = {r["plan"]: r for r in json.load(f)["results"]}
    rows = []
    for label, choice in plans:
        q = net if choice is None else apply_plan(copy.deepcopy(net), choice)
        row = dict(saved.get(label, {}), plan=label)
        if choice is None:
            row["bits"] = 32.0
        else:
            row["bits"] = plan_bits(stats, choice)
            counts: dict[str, int] = {}
            for v in choice.values():
                counts[v] = counts.get(v, 0) + 1
            row["formats"] = counts
        if not ns.speed_only:
            row["ppl"] = perplexity(q, held_out, context=ns.context).ppl
        row["decode_tok_s"] = decode_tok_s(q)
        rows.append(row)
        print(f"{label}: {row['bits']:.3f} bits, ppl {row['ppl']:.3f}, "
              f"{row['decode_tok_s']:.1f} tok/s {row.get('formats', '')}", flush=True)
    base = rows[0]["ppl"]
    meta = {"cpu": cpu_name(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sensitivity_tokens": len(calib), "eval_tokens": len(held_out),
            "context": ns.context, "measure_s": measure_s}
    with open(os.path.join(ns.out, "mixed.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    lines = ["| plan | bits/weight | held-out ppl | vs float | decode tok/s | formats |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['plan']} | {r['bits']:.3f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / base - 1):+.2f}% | {r['decode_tok_s']:.1f} | "
              f"{r.get('formats', '')} |" for r in rows]
    with open(os.path.join(ns.out, "mixed.md"), "w") as f:
        f.write(f"{meta['cpu']}, {meta['time']}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, base, os.path.join("docs", "images", "mixed_precision_frontier.png"))


def _plot(rows: list[dict], base: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "bits", "bits per weight (scales included)"),
                           (axes[1], "decode_tok_s", "single-stream decode tok/s (2 threads)")):
        for kind, marker in (("uniform", "o"), ("mixed", "s")):
            pts = [(r[key], r["ppl"], r["bits"]) for r in rows if r["plan"] != "float32"
                   and r["plan"].startswith("mixed") == (kind == "mixed")]
            xs, ys, bits = zip(*sorted(pts))
            # along bits a frontier (a line); along tok/s points, each labelled with its bits
            ax.plot(xs, ys, marker=marker, label=kind,
                    linestyle="-" if key == "bits" else "none")
            if key != "bits":
                for x, y, b in pts:
                    ax.annotate(f"{b:.2f}", (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
        ax.axhline(base, color="gray", linestyle="--", label="float32")
        ax.set_xlabel(label)
        ax.legend()
    axes[0].set_ylabel("held-out perplexity")
    fig.suptitle("SmolLM2-135M: per-layer mixed precision vs uniform")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
