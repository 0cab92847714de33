"""Decode speed of a mixture of experts against the dense model with the same active
parameters, float and int4, so the cost of routing shows.

    .venv/bin/python scripts/bench_moe.py [--layers 4] [--output-len 32] [--threads 1]

The MoE is Mixtral-shaped with random weights (hidden 512, 8 experts of width 1024, top-2);
its dense twin has one SwiGLU MLP of width 2048, so a token multiplies the same number of
weights in both. Decode tok/s at batch 1 and 8 comes from `peregrine bench latency`'s
measurement (the median of the steps in which every sequence decodes). Both run the eager
torch layers (`enforce_eager`); the int4 dense model is also timed on its default path,
the fused C++ step, which MoE models do not have. A second table times one layer's MLP
block alone (the MoE block against the dense MLP, median of --repeats rounds over as many
distinct blocks as layers, so that weights come from memory as in a model, not from the
32 MB L3). Every measurement is repeated --runs times, the cases interleaved, and the
best run is reported (on a shared machine the fastest run is the better estimate of the
cost itself; the JSON keeps every run), with the MoE / dense ratio as the median of the
runs' own ratios (the two run back to back, so they share the load of the moment).
Writes JSON and a markdown table under --out."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from peregrine.bench.latency import run_latency
from peregrine.bench.roofline import cpu_peak
from peregrine.config import EngineConfig
from peregrine.layers.moe import SparseMoE
from peregrine.models.llama import MLP
from peregrine.quantization.apply import QuantSpec, quantize_model

HIDDEN, EXPERTS, TOP_K, EXPERT_WIDTH = 512, 8, 2, 1024


def configs(layers: int) -> dict[str, dict]:
    """config.json of the MoE and of its dense twin (same active parameters per token)."""
    base = dict(vocab_size=8192, hidden_size=HIDDEN, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False)
    moe = dict(base, architectures=["MixtralForCausalLM"], model_type="mixtral",
               intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
               num_experts_per_tok=TOP_K)
    dense = dict(base, architectures=["MistralForCausalLM"], model_type="mistral",
                 intermediate_size=TOP_K * EXPERT_WIDTH, sliding_window=None)
    return {"moe": moe, "dense": dense}


def decode_tok_s(path: str, quantization: str, eager: bool, threads: int, output_len: int,
                 peak) -> dict[int, float]:
    """Decode tok/s at batch 1 and 8 (median step) of the model in `path`."""
    cfg = EngineConfig(model=path, load_format="dummy", dtype="float32", device="cpu",
                       quantization=quantization, quantization_group_size=32,
                       enforce_eager=eager, num_threads=threads, kv_cache_memory=0.25,
                       max_num_seqs=8)
    result = run_latency(cfg, peak, [], [1, 8], output_len=output_len, decode_prompt_len=64)
    return {d["batch_size"]: d["tokens_per_s"] for d in result["decode"]}


def block_ms(blocks: list[torch.nn.Module], tokens: int, repeats: int) -> float:
    """Median milliseconds of one forward on `tokens` random rows, the blocks called in
    turn (new rows each call, so the router spreads them as a model's layers would)."""
    g = torch.Generator().manual_seed(tokens)
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):
            for block in blocks:
                x = torch.randn(tokens, HIDDEN, generator=g)
                t0 = time.perf_counter()
                block(x)
                if r:  # the first round warms up
                    times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def layer_blocks(quantization: str, copies: int
                 ) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """`copies` random MoE blocks and as many dense twin MLPs, quantized when asked."""
    torch.manual_seed(0)
    moes = [SparseMoE(HIDDEN, EXPERTS, TOP_K, EXPERT_WIDTH, True) for _ in range(copies)]
    denses = [MLP(HIDDEN, TOP_K * EXPERT_WIDTH) for _ in range(copies)]
    for block in moes + denses:
        for p in block.parameters():
            p.data.normal_(0, 0.02)
        if quantization != "none":
            quantize_model(block, QuantSpec(quantization, 32))
    return moes, denses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=32)
    # one thread: two contend with the other jobs of a shared 2-core machine
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="docs/bench-results/moe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    peak = cpu_peak(args.threads)
    tmp = tempfile.mkdtemp()
    paths = {}
    for name, cfg in configs(args.layers).items():
        paths[name] = os.path.join(tmp, name)
        os.makedirs(paths[name])
        with open(os.path.join(paths[name], "config.json"), "w") as f:
            json.dump(cfg, f)
    cases = [("moe", "none", True), ("dense", "none", True), ("moe", "int4", True),
             ("dense", "int4", True), ("dense", "int4", False)]
    measured: dict[int, list[dict[int, float]]] = {i: [] for i in range(len(cases))}
    for _ in range(args.runs):
        for i, (model, quant, eager) in enumerate(cases):
            measured[i].append(decode_tok_s(paths[model], quant, eager, args.threads,
                                            args.output_len, peak))
            print(cases[i], measured[i][-1], flush=True)
    rows = [{"model": model, "weights": "float32" if quant == "none" else quant,
             "path": "eager" if eager else "fused C++ step",
             "batch_1_tok_s": max(r[1] for r in measured[i]),
             "batch_8_tok_s": max(r[8] for r in measured[i]), "runs": measured[i]}
            for i, (model, quant, eager) in enumerate(cases)]
    ratios = []
    for weights, (moe, dense) in (("float32", (0, 1)), ("int4", (2, 3))):
        ratios.append({"weights": weights, **{
            f"batch_{b}": statistics.median(m[b] / d[b] for m, d in zip(measured[moe],
                                                                         measured[dense]))
            for b in (1, 8)}})
    blocks = []
    for quant in ("none", "int4"):
        moes, denses = layer_blocks(quant, max(args.layers, 6))
        for tokens in (1, 8):
            moe_runs, dense_runs = [], []
            for _ in range(args.runs):
                moe_runs.append(block_ms(moes, tokens, args.repeats))
                dense_runs.append(block_ms(denses, tokens, args.repeats))
            blocks.append({"weights": "float32" if quant == "none" else quant,
                           "tokens": tokens, "moe_ms": min(moe_runs),
                           "dense_ms": min(dense_runs), "moe_runs": moe_runs,
                           "dense_runs": dense_runs})
            print(blocks[-1], flush=True)
    result = {"kind": "moe", "settings": {**vars(args), "hidden": HIDDEN, "experts": EXPERTS,
                                          "top_k": TOP_K, "expert_width": EXPERT_WIDTH,
                                          "dense_width": TOP_K * EXPERT_WIDTH},
              "configs": configs(args.layers), "decode": rows, "moe_over_dense": ratios,
              "block": blocks,
              "peak": peak.to_dict(),
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| model | weights | path | batch 1 tok/s | batch 8 tok/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights']} | {r['path']} | {r['batch_1_tok_s']:.1f} | "
              f"{r['batch_8_tok_s']:.1f} |" for r in rows]
    lines += ["", "| weights | MoE / dense, batch 1 | MoE / dense, batch 8 |", "|---|---|---|"]
    lines += [f"| {r['weights']} | {r['batch_1']:.2f} | {r['batch_8']:.2f} |" for r in ratios]
    lines += ["", "| weights | tokens | MoE block ms | dense MLP ms | ratio |",
              "|---|---|---|---|---|"]
    lines += [f"| {b['weights']} | {b['tokens']} | {b['moe_ms']:.3f} | {b['dense_ms']:.3f} | "
              f"{b['moe_ms'] / b['dense_ms']:.2f} |" for b in blocks]
    with open(os.path.join(args.out, "moe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
