"""Perplexity of GGUF K-quant files served from their own blocks, against the float model.

Makes (once, into --dir) SmolLM2-135M as float32, Q4_K_M and Q6_K GGUF files from the
embedded Q4_1 file with peregrine/quantization/kquants.py (its scale search for the least
squared error, plain and weighted per input column by an importance matrix collected on
the calibration half of the corpus, `*-peregrine-imatrix.gguf`), and, where llama.cpp's
`llama-quantize` is found (../shared/peers/build_llamacpp.sh builds llama.cpp; build the
`llama-quantize` target in the same tree), the same recipes by llama.cpp itself. Each file
is then scored on the shipped held-out text (peregrine/quantization/perplexity.py), kept in
its blocks (`--quantization gguf`, the default on a CPU; `--dequantized` also scores each
file dequantized to float, which separates the format's loss from the kernels' int8
activations). "float" is the float32 file: the embedded
model's Q4_1 weights dequantized, the only float weights this machine has.

Usage: .venv/bin/python scripts/quality_kquants.py [--max-tokens N] [--dir DIR]
Writes docs/bench-results/quality_kquants.json and prints a table."""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import time

import torch

from peregrine.bench.env import environment
from peregrine.bench.results import save_json
from peregrine.models.loader import load_model
from peregrine.models.registry import default_gguf_path
from peregrine.quantization.corpus import eval_text
from peregrine.quantization.kquants import importance_from_calibration, write_recipe
from peregrine.quantization.perplexity import perplexity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "bench-results", "quality_kquants.json")
RECIPES = ("Q4_K_M", "Q6_K")
TARGETS = {"Q4_K_M": 0.02, "Q6_K": 0.005}  # issue 16: within 2% / 0.5% of float


def llama_quantize() -> str | None:
    """llama.cpp's llama-quantize binary next to the peer build, if it was built."""
    found = glob.glob(os.path.expanduser("~/.cache/peregrine/llama.cpp-*/src/llama.cpp/build/"
                                         "bin/llama-quantize"))
    return found[0] if found else None


def make_files(d: str) -> dict[str, str]:
    """label -> path of every file to score (made when missing)."""
    os.makedirs(d, exist_ok=True)
    files = {"float32": os.path.join(d, "smollm2-F32.gguf")}
    if not os.path.exists(files["float32"]):
        write_recipe(default_gguf_path(), files["float32"], "F32")
    quantize = llama_quantize()
    importance = None
    for r in RECIPES:
        ours = os.path.join(d, f"smollm2-{r}-peregrine.gguf")
        if not os.path.exists(ours):
            write_recipe(default_gguf_path(), ours, r)
        files[f"{r} (peregrine's quantizer)"] = ours
        weighted = os.path.join(d, f"smollm2-{r}-peregrine-imatrix.gguf")
        if not os.path.exists(weighted):
            importance = importance or importance_from_calibration(default_gguf_path())
            write_recipe(default_gguf_path(), weighted, r, importance)
        files[f"{r} (peregrine's quantizer, imatrix)"] = weighted
        if quantize:
            theirs = os.path.join(d, f"smollm2-{r}-llama.cpp.gguf")
            if not os.path.exists(theirs):
                env = {**os.environ, "LD_LIBRARY_PATH": os.path.dirname(quantize)}
                subprocess.run([quantize, files["float32"], theirs, r, "2"], check=True,
                               env=env, capture_output=True)
            files[f"{r} (llama-quantize)"] = theirs
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/peregrine/kquants"))
    ap.add_argument("--dequantized", action="store_true",
                    help="also score each file dequantized to float")
    ap.add_argument("--output", default=OUT)
    ns = ap.parse_args()
    files = make_files(ns.dir)
    ids = None
    rows: dict[str, dict] = {}
    for label, path in files.items():
        modes = ["none"] if label == "float32" else ["gguf"] + ["none"] * ns.dequantized
        for quant in modes:
            t0 = time.perf_counter()
            loaded = load_model(path, quantization=quant)
            if ids is None:
                ids = loaded.tokenizer.encode(eval_text(), add_special_tokens=False)
                ids = ids[:ns.max_tokens] if ns.max_tokens else ids
            p = perplexity(loaded.model, ids, context=ns.context)
            name = label if label == "float32" else f"{label}, {'blocks' if quant == 'gguf' else 'dequantized'}"
            rows[name] = {"file": os.path.basename(path), "bytes": os.path.getsize(path),
                          "quantization": quant, "ppl": p.ppl, "tokens": p.num_tokens,
                          "seconds": round(time.perf_counter() - t0, 1)}
            print(name, json.dumps(rows[name]), flush=True)
    ref = rows["float32"]["ppl"]
    print("\n| file | served | size (MB) | ppl | vs float | target |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        r["ppl_vs_float"] = r["ppl"] / ref - 1
        recipe = next((k for k in TARGETS if name.startswith(k)), None)
        if recipe and r["quantization"] == "gguf":
            r["within_target"] = r["ppl_vs_float"] <= TARGETS[recipe]
        target = f"<= {100 * TARGETS[recipe]:.1f}%" if recipe else "-"
        served = "blocks" if r["quantization"] == "gguf" else "float"
        print(f"| {name.rsplit(', ', 1)[0]} | {served} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.4f} |"
              f" {100 * r['ppl_vs_float']:+.2f}% | {target} |")
    out = {"model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized = float32)",
           "text": "peregrine/quantization/corpus.py eval_text() (bundled, held out)",
           "tokens": len(ids), "context": ns.context, "results": rows,
           "machine": environment(threads=torch.get_num_threads()),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    save_json(out, ns.output)
    print(f"wrote {ns.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
