"""`peregrine estimate` against reality on this machine (docs/estimate.md).

Memory: each case runs in a fresh process: the engine with the pool `estimate` sizes
(--num-kv-blocks = its kv_blocks), max_num_seqs prompts of max_model_len / 2 tokens;
measured: the loaded model's sum(numel * element_size), the pool's bytes, peak RSS.
Speed: `peregrine bench workloads` JSON files with pp256, tg256 and batch4x32x64 (the
calibration in devices.json uses pp512 and tg128 of the same runs: these workloads are not
the ones it was fitted on); the median of the files against the prediction.

    python scripts/estimate_check.py --speed /tmp/est/speed-*.json --out docs/bench-results/estimate
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
from typing import Any

CASES = [  # (label, model, quantization, max_num_seqs, max_model_len)
    ("SmolLM2-135M", None, "none", 4, 2048),
    ("SmolLM2-135M", None, "int8", 4, 2048),
    ("SmolLM2-135M", None, "int4", 4, 2048),
    ("SmolLM2-135M", None, "gguf", 4, 2048),
    ("qwen2.5-0.5b (dummy)", "qwen2.5-0.5b", "none", 2, 512),
    ("qwen2.5-0.5b (dummy)", "qwen2.5-0.5b", "int4", 2, 512),
    ("llama-3.2-1b (dummy)", "llama-3.2-1b", "int8", 2, 512),
]


def child(model: str | None, quantization: str, seqs: int, max_len: int, blocks: int) -> None:
    """Run one engine and print what it allocated."""
    from peregrine import LLM, SamplingParams
    kw: dict[str, Any] = dict(quantization=quantization, num_kv_blocks=blocks,
                              max_model_len=max_len, max_num_seqs=seqs, num_threads=2)
    if model:
        kw.update(model=model, load_format="dummy")
    llm = LLM(**kw)
    from peregrine.memory_model import held_kv_bytes, held_weight_bytes
    weights = held_weight_bytes(llm.engine.loaded.model)
    pool = held_kv_bytes(llm.engine.kv_caches)
    rng = random.Random(0)
    vocab = llm.engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(max_len // 2)]}
               for _ in range(seqs)]
    llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"weights_bytes": weights, "kv_cache_bytes": pool, "peak_rss": peak}))


def predict(model: str | None, quantization: str, seqs: int, max_len: int) -> dict[str, Any]:
    from peregrine.config import EngineConfig
    from peregrine.estimate import EstimateOptions, estimate
    return estimate(EngineConfig(model=model, quantization=quantization, device="cpu",
                                 max_model_len=max_len, max_num_seqs=seqs),
                    EstimateOptions(devices=["CPU"]))


def memory_rows(measured: list[dict[str, Any]] | None = None,
                only: set[int] | None = None) -> list[dict[str, Any]]:
    """Each case predicted, and measured in a fresh process (or taken from `measured`, the
    rows of an earlier run: to predict again after a calibration changes)."""
    rows = []
    for i, (label, model, quant, seqs, max_len) in enumerate(CASES):
        if only is not None and i not in only:
            continue
        p = predict(model, quant, seqs, max_len)
        if measured:
            real = {k: measured[i][k]["measured"]
                    for k in ("weights_bytes", "kv_cache_bytes", "peak_rss")}
        else:
            out = subprocess.run([sys.executable, __file__, "--child", model or "", quant,
                                  str(seqs), str(max_len), str(p["kv_blocks"])],
                                 capture_output=True, text=True, check=True)
            real = json.loads(out.stdout.strip().splitlines()[-1])
        row = {"case": label, "quantization": quant, "seqs_x_len": f"{seqs} x {max_len}"}
        for key, pred in (("weights_bytes", p["weights_bytes"]),
                          ("kv_cache_bytes", p["kv_cache_bytes"]),
                          ("peak_rss", p["peak_total_bytes"])):
            row[key] = {"predicted": pred, "measured": real[key],
                        "error": round(pred / real[key] - 1, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def speed_rows(files: list[str]) -> list[dict[str, Any]]:
    """Every workload of the files against the prediction (median over files); the
    calibration's own workloads are marked."""
    import re

    from peregrine.config import EngineConfig
    from peregrine.estimate.core import (cpu_device, decode_tok_s, memory_estimate,
                                         model_cost, model_spec, prefill_tok_s)
    from peregrine.bench.roofline import cpu_name
    from peregrine.estimate.devices import cpu_calibrations, pick_calibration
    from peregrine.memory_model import resolve_quantization
    by_quant: dict[str, list[dict]] = {}
    for path in files:
        with open(path) as f:
            suite = json.load(f)
        settings = suite["runs"][0]["settings"]
        quant = resolve_quantization(settings["quantization"], settings["load_format"] == "gguf",
                                     "cpu")
        by_quant.setdefault(quant, []).append(suite)
    rows = []
    for quant, suites in by_quant.items():
        threads = suites[0]["env"]["threads"]
        config = EngineConfig(quantization=quant, device="cpu", num_threads=threads)
        spec = model_spec(None)
        mem = memory_estimate(spec, config, "cpu")
        dev = cpu_device(config, mem.quantization)
        cost = model_cost(spec, mem)
        bw, fl = dev.bandwidth * dev.decode_efficiency, dev.flops * dev.prefill_efficiency
        cases: dict[str, tuple] = {}
        for w in dict.fromkeys(r["workload"] for s in suites for r in s["runs"]):
            if m := re.fullmatch(r"pp(\d+)", w):
                n = int(m[1])
                cases[f"{w} prefill"] = (w, lambda r: r["tokens_per_s"],
                                         prefill_tok_s(cost, n, mem.step_tokens, bw, fl))
            elif m := re.fullmatch(r"tg(\d+)", w):
                n = int(m[1])
                cases[f"{w} decode, 1 stream"] = (w, lambda r: r["tokens_per_s"],
                                                  decode_tok_s(cost, 1, max(n // 2, 1), bw, fl))
            elif m := re.fullmatch(r"batch(\d+)x(\d+)x(\d+)", w):
                b, p, g = map(int, m.groups())
                cases[f"{w} decode phase, {b} streams"] = (
                    w, lambda r: r["decode"]["tokens_per_s"], decode_tok_s(cost, b, p + g // 2,
                                                                           bw, fl))
                cases[f"{w} prefill phase, {b} prompts"] = (
                    w, lambda r: r["prefill"]["tokens_per_s"],
                    prefill_tok_s(cost, p, mem.step_tokens, bw, fl, num_prompts=b))
        cal = pick_calibration(cpu_calibrations(), cpu_name(), threads, mem.quantization)
        for name, (workload, get, pred) in cases.items():
            measured = [get(r) for s in suites for r in s["runs"] if r["workload"] == workload]
            med = statistics.median(measured)
            row = {"quantization": quant, "threads": threads, "workload": name,
                   "calibration": workload in (cal.prefill_workload, cal.decode_workload),
                   "predicted_tok_s": round(pred, 1), "measured_tok_s": round(med, 1),
                   "runs": [round(x, 1) for x in measured], "error": round(pred / med - 1, 4),
                   "load_average": [s["env"]["load_average"][0] for s in suites],
                   "efficiency": {"decode": round(dev.decode_efficiency, 4),
                                  "prefill": round(dev.prefill_efficiency, 4)}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(mem: list[dict], speed: list[dict]) -> str:
    mib = 2**20
    lines = ["| case | quantization | seqs x len | weights pred / meas (MiB) | err | "
             "KV pool pred / meas (MiB) | err | peak RSS pred / meas (MiB) | err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in mem:
        cells = []
        for k in ("weights_bytes", "kv_cache_bytes", "peak_rss"):
            v = r[k]
            cells += [f"{v['predicted'] / mib:,.1f} / {v['measured'] / mib:,.1f}",
                      f"{v['error']:+.1%}"]
        lines.append(f"| {r['case']} | {r['quantization']} | {r['seqs_x_len']} | "
                     + " | ".join(cells) + " |")
    if speed:
        lines += ["", "| quantization | threads | workload | predicted tok/s | measured tok/s "
                  "(median; runs) | err | load avg |", "|---|---|---|---|---|---|---|"]
        for r in speed:
            name = r["workload"] + (" (calibration)" if r["calibration"] else "")
            lines.append(f"| {r['quantization']} | {r['threads']} | {name} | "
                         f"{r['predicted_tok_s']} | {r['measured_tok_s']} "
                         f"({', '.join(map(str, r['runs']))}) | {r['error']:+.1%} | "
                         f"{', '.join(f'{x:.1f}' for x in r['load_average'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, quant, seqs, max_len, blocks = sys.argv[2:7]
        child(model or None, quant, int(seqs), int(max_len), int(blocks))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed", nargs="*", default=[], help="bench workloads JSON files")
    p.add_argument("--no-memory", action="store_true", help="skip the memory cases")
    p.add_argument("--cases", default=None, help="comma-separated indices of CASES to run")
    p.add_argument("--measured", default=None,
                   help="an earlier estimate_check.json: reuse its measured memory, predict again")
    p.add_argument("--out", default=None, help="directory for estimate_check.json/.md")
    ns = p.parse_args()
    from peregrine.bench.env import environment
    measured = None
    if ns.measured:
        with open(ns.measured) as f:
            measured = json.load(f)["memory"]
    only = {int(x) for x in ns.cases.split(",")} if ns.cases else None
    mem = [] if ns.no_memory else memory_rows(measured, only)
    speed = speed_rows(ns.speed) if ns.speed else []
    result = {"env": environment(2, argv=["(scripts/estimate_check.py)", *sys.argv[1:]]),
              "memory": mem, "speed": speed}
    if ns.out:
        os.makedirs(ns.out, exist_ok=True)
        with open(os.path.join(ns.out, "estimate_check.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(ns.out, "estimate_check.md"), "w") as f:
            f.write(markdown(mem, speed))
    print(markdown(mem, speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
