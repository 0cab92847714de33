"""Decode speed of a mixture-of-experts GGUF file served from its own blocks against the
same file dequantized to float32 at load.

    PYTHONPATH=. .venv/bin/python scripts/bench_moe_gguf.py [--layers 4] [--tokens 64] \
        [--threads 1 2] [--runs 3] [--qtype Q4_0]

The model is bench_moe.py's Mixtral shape (hidden 512, 8 heads over 2 KV heads, 8 experts
of width 1024, top-2, vocabulary 8192) with transformers' random initialization, written
with llama.cpp's names by the tests' writer (tests/models/moe_gguf.py): every matrix in
--qtype, the routers float32 as llama.cpp keeps them. Each case is `peregrine.LLM(model=
PATH, num_threads=T, quantization=auto|none)` generating --tokens greedy tokens (ignore_eos)
for one 8-token prompt after a warm-up generation; tok/s is tokens over the wall time of
the generate call (the 8-token prefill included). The cases run interleaved --runs times and
the best run is reported (the machine is shared: the fastest run is the better estimate of
the cost itself); every run is printed and written to --out as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peregrine import LLM, SamplingParams  # noqa: E402
from peregrine.models.gguf_file import GGUFFile  # noqa: E402
from peregrine.models.registry import default_gguf_path  # noqa: E402
from scripts.bench_moe import configs  # noqa: E402
from tests.models.moe_gguf import write_moe_gguf  # noqa: E402


def write_file(path: str, layers: int, qtype: str) -> None:
    """bench_moe.py's Mixtral config with random weights, as a GGUF file in `qtype`."""
    import transformers
    cfg = {k: v for k, v in configs(layers)["moe"].items()
           if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    ref = transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg)).eval()
    write_moe_gguf(path, ref, "llama", GGUFFile(default_gguf_path()).metadata, qtype)


def tok_s(llm: LLM, tokens: int) -> float:
    """Greedy tokens per second of one 8-token prompt generating `tokens` tokens."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": [1, 77, 300, 514, 2, 9, 400, 3]}
    t0 = time.perf_counter()
    out = llm.generate(prompt, params)
    elapsed = time.perf_counter() - t0
    assert len(out[0].outputs[0].token_ids) == tokens
    return tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--qtype", default="Q4_0")
    ap.add_argument("--out", default="docs/bench-results/moe/moe_gguf.json")
    args = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(), f"mixtral-{args.qtype}.gguf")
    write_file(path, args.layers, args.qtype)
    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {}
    for threads in args.threads:
        llms = {}
        for quantization in ("auto", "none"):  # auto: the file's blocks on a CPU
            t0 = time.perf_counter()
            llms[quantization] = LLM(model=path, num_threads=threads,
                                     quantization=quantization, kv_cache_memory=0.05)
            print(f"threads {threads} {quantization}: loaded in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            tok_s(llms[quantization], 8)  # warm-up
        for _ in range(args.runs):
            for quantization, llm in llms.items():
                key = f"{quantization} threads={threads}"
                runs.setdefault(key, []).append(tok_s(llm, args.tokens))
                print(key, f"{runs[key][-1]:.1f} tok/s", flush=True)
    result = {"settings": vars(args), "runs": runs,
              "best": {k: max(v) for k, v in runs.items()},
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["best"], indent=1), result["load_average"])


if __name__ == "__main__":
    main()
