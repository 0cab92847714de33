"""Decode speed of llama.cpp's K-quant recipes against Q4_1 on a model whose rows are whole
256-weight super-blocks, beside llama.cpp on the same files.

    .venv/bin/python scripts/bench_kquants.py [--config qwen3-0.6b] \
        [--recipes Q4_1,Q4_K_M,Q6_K] [--repetitions 3] [--threads 2]

SmolLM2 (hidden 576) is a poor probe of the K-quants: 576 is not a multiple of 256, so
llama.cpp's Q4_K_M recipe is mostly Q5_0 there. This builds a shipped real config (default
Qwen3-0.6B: hidden 1024, MLP 3072, 28 layers) with transformers' random initialization and
the default GGUF's tokenizer (its 49,152-token vocabulary replaces Qwen3's 151,936: decode
speed does not depend on the values), writes it as a float32 GGUF with llama.cpp's names
(the tests' writer, tests/models/gguf_writer.py), quantizes it with llama.cpp's own
`llama-quantize` (peregrine's writer, peregrine/quantization/kquants.py, where it is not
built) and runs `peregrine bench compare --workloads tg128 --engines peregrine,llama.cpp`
on each file. Files go to --dir (about 2 GB for the float32 one, made once); results to
docs/bench-results/kquants-aligned/<recipe>.json and a table on stdout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from peregrine.models.gguf_file import GGUFFile  # noqa: E402
from peregrine.models.registry import default_gguf_path, resolve_model  # noqa: E402
from peregrine.quantization.kquants import write_recipe  # noqa: E402
from scripts.quality_kquants import llama_quantize  # noqa: E402
from tests.models.gguf_writer import write_model_gguf  # noqa: E402

OUT = os.path.join(ROOT, "docs", "bench-results", "kquants-aligned")


def write_float_file(path: str, config: str) -> None:
    """`config`'s shipped architecture with random weights and SmolLM2's tokenizer, as a
    float32 GGUF."""
    import transformers
    with open(os.path.join(resolve_model(config).path, "config.json")) as fh:
        cfg = json.load(fh)
    meta = GGUFFile(default_gguf_path()).metadata
    cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    cfg.update(bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
               eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    hf = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf).float().eval()
    write_model_gguf(path, model, cfg["model_type"], meta, head_dim=getattr(hf, "head_dim", None))


def make_files(d: str, config: str, recipes: list[str]) -> dict[str, str]:
    """recipe -> path, each made when missing (llama-quantize, else peregrine's writer)."""
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, f"{config}-F32.gguf")
    if not os.path.exists(src):
        write_float_file(src, config)
    quantize = llama_quantize()
    files = {}
    for r in recipes:
        files[r] = os.path.join(d, f"{config}-{r}.gguf")
        if os.path.exists(files[r]):
            continue
        if quantize:
            env = {**os.environ, "LD_LIBRARY_PATH": os.path.dirname(quantize)}
            subprocess.run([quantize, src, files[r], r, "2"], check=True, env=env,
                           capture_output=True)
        else:
            write_recipe(src, files[r], r)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="qwen3-0.6b")
    ap.add_argument("--recipes", default="Q4_1,Q4_K_M,Q6_K")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/peregrine/kquants-aligned"))
    ap.add_argument("--output-dir", default=OUT)
    ns = ap.parse_args()
    files = make_files(ns.dir, ns.config, ns.recipes.split(","))
    rows = []
    for recipe, path in files.items():
        out = os.path.join(ns.output_dir, f"{recipe}.json")
        subprocess.run([sys.executable, "-m", "peregrine.cli", "bench", "compare",
                        "--workloads", "tg128", "--engines", "peregrine,llama.cpp",
                        "--threads", str(ns.threads), "--seed", "0",
                        "--repetitions", str(ns.repetitions), "--model", path,
                        "--output-dir", os.path.join(ns.output_dir, recipe), "--output", out],
                       check=True, cwd=ROOT)
        with open(out) as fh:
            runs = json.load(fh)["runs"]
        tok = {r["engine"]: round(r["tokens_per_s"], 1) for r in runs}
        rows.append((recipe, os.path.getsize(path), tok.get("peregrine"), tok.get("llama.cpp")))
    print(f"\n{ns.config}, random weights, tg128, {ns.threads} threads")
    print("| file | size | peregrine tok/s | llama.cpp tok/s | ratio |")
    print("|---|---|---|---|---|")
    for recipe, size, ours, theirs in rows:
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        print(f"| {recipe} | {size / 1e6:.0f} MB | {ours or '-'} | {theirs or '-'} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
