"""Mixed precision per layer vs uniform formats: held-out perplexity at each size.

    .venv/bin/python scripts/bench_mixed.py [--sensitivity-tokens 256] [--eval-tokens 2048]

Measures every decoder linear's sensitivity of SmolLM2-135M (float weights from the GGUF,
calibration half of the bundled corpus), then quantizes the model uniformly to each
candidate format and mixed at each uniform format's size, and reports bits per weight and
perplexity on the held-out half. Writes JSON, a markdown table and the frontier plot."""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensitivity-tokens", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default="docs/bench-results/mixed")
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
    base = perplexity(net, held_out, context=ns.context).ppl
    rows = [{"plan": "float32", "bits": 32.0, "ppl": base}]
    print(f"float32: ppl {base:.3f} (sensitivity measured in {measure_s:.0f}s)", flush=True)
    for fmt in CANDIDATES[:-1]:  # int8 is the top: mixed at its size would be all int8
        name = format_name(fmt)
        bits = uniform_bits(stats, fmt)
        plans = [(name, {s.name: name for s in stats})]
        if fmt != CANDIDATES[0]:  # at the smallest size every plan is the uniform one
            plans.append((f"mixed @ {name}", plan(stats, bits)))
        for label, choice in plans:
            q = apply_plan(copy.deepcopy(net), choice)
            ppl = perplexity(q, held_out, context=ns.context).ppl
            counts: dict[str, int] = {}
            for v in choice.values():
                counts[v] = counts.get(v, 0) + 1
            rows.append({"plan": label, "bits": plan_bits(stats, choice), "ppl": ppl,
                         "formats": counts})
            print(f"{label}: {rows[-1]['bits']:.3f} bits, ppl {ppl:.3f} {counts}", flush=True)
    int8 = {s.name: "int8" for s in stats}
    rows.append({"plan": "int8", "bits": plan_bits(stats, int8),
                 "ppl": perplexity(apply_plan(copy.deepcopy(net), int8), held_out,
                                   context=ns.context).ppl, "formats": {"int8": len(stats)}})
    meta = {"cpu": cpu_name(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sensitivity_tokens": len(calib), "eval_tokens": len(held_out),
            "context": ns.context, "measure_s": measure_s}
    with open(os.path.join(ns.out, "mixed.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    lines = ["| plan | bits/weight | held-out ppl | vs float | formats |", "|---|---|---|---|---|"]
    lines += [f"| {r['plan']} | {r['bits']:.3f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / base - 1):+.2f}% | {r.get('formats', '')} |" for r in rows]
    with open(os.path.join(ns.out, "mixed.md"), "w") as f:
        f.write(f"{meta['cpu']}, {meta['time']}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, base, os.path.join("docs", "images", "mixed_precision_frontier.png"))


def _plot(rows: list[dict], base: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("uniform", "o"), ("mixed", "s")):
        pts = [(r["bits"], r["ppl"]) for r in rows if r["plan"] != "float32"
               and r["plan"].startswith("mixed") == (kind == "mixed")]
        ax.plot(*zip(*sorted(pts)), marker=marker, label=kind)
    ax.axhline(base, color="gray", linestyle="--", label="float32")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M: per-layer mixed precision vs uniform")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
