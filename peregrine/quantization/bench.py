"""`peregrine eval quant-table`: one command for docs/quantization.md's table.

For each method on the embedded SmolLM2-135M: weight bytes, perplexity on the bundled
held-out text, kernel bandwidth of the linears at one row (decode), single-stream decode
tok/s and 32-stream throughput through the engine; plus the int8/fp8 KV cache's perplexity
and pool size for the same kv_cache_memory. Writes JSON and a markdown table."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

from peregrine.layers.linear import QuantLinear
from peregrine.quantization.apply import linear_layers, model_weight_bytes


@dataclass
class Row:
    """One line of the table: how to load the model, and what was measured."""

    name: str
    model: str | None = None  # None: the embedded default
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    make: dict | None = None  # QuantizeOptions fields: build a checkpoint first
    group_size: int | None = None  # for quantization at load
    results: dict = field(default_factory=dict)


ROWS = [
    Row("float32"),
    Row("int8", quantization="int8"),
    Row("int4-rtn", quantization="int4"),
    Row("int4-rtn g32", quantization="int4", group_size=32),
    Row("int4-gptq", make={"method": "gptq", "format": "int4"}),
    Row("int4-awq", make={"method": "awq", "format": "int4"}),
    Row("nf4", quantization="nf4"),
    Row("fp8", quantization="fp8"),
    Row("gguf-native", quantization="gguf"),
    Row("float32 + kv int8", kv_cache_dtype="int8"),
    Row("float32 + kv fp8", kv_cache_dtype="fp8"),
]


def kernel_bandwidth(net: torch.nn.Module, repeats: int = 20) -> dict:
    """GB/s and time of one pass over every linear at one row of input (a decode step)."""
    mods = [m for _, _, _, m in linear_layers(net)]
    xs = [torch.randn(1, m.in_features) for m in mods]
    nbytes = sum(m.weight_bytes() if isinstance(m, QuantLinear)
                 else m.weight.numel() * m.weight.element_size() for m in mods)
    with torch.inference_mode():
        for m, x in zip(mods, xs):
            m(x)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for m, x in zip(mods, xs):
                m(x)
            best = min(best, time.perf_counter() - t)
    return {"linear_bytes": nbytes, "linear_ms": round(best * 1e3, 3),
            "kernel_gb_s": round(nbytes / best / 1e9, 2)}


def decode_speed(llm, batch: int, tokens: int) -> float:
    """Generated tokens per second with `batch` concurrent greedy streams (decode only:
    from each request's first token to its last)."""
    from peregrine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1 + (7 * i) % 900, 504, 3575, 28, 253]}
               for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    if batch == 1:
        m = outs[0].metrics
        return (tokens - 1) / (m.last_token_time - m.first_token_time)
    return batch * tokens / (time.perf_counter() - t0)


def measure(row: Row, args: argparse.Namespace, work: str) -> dict:
    from peregrine import LLM
    from peregrine.quantization.corpus import eval_text
    from peregrine.quantization.perplexity import perplexity
    from peregrine.quantization.quantize import QuantizeOptions, quantize_to_dir
    model = row.model
    res: dict = {}
    if row.make is not None:
        model = os.path.join(work, row.name)
        if not os.path.isfile(os.path.join(model, "config.json")):  # reuse a finished one
            t = time.perf_counter()
            quantize_to_dir(None, model, QuantizeOptions(**row.make))
            res["quantize_s"] = round(time.perf_counter() - t, 1)
    llm = LLM(model, quantization=row.quantization, kv_cache_dtype=row.kv_cache_dtype,
              kv_cache_memory=0.25, max_num_seqs=max(args.batch, 1),
              num_threads=args.threads, quantization_group_size=row.group_size)
    net = llm.engine.loaded.model
    res["weight_mb"] = round(model_weight_bytes(net) / 2**20, 1)
    res.update(kernel_bandwidth(net))
    ids = llm.get_tokenizer().encode(eval_text(), add_special_tokens=False)[:args.ppl_tokens]
    ppl = perplexity(net, ids, context=min(1024, len(ids)), kv_cache_dtype=row.kv_cache_dtype)
    res["ppl"] = round(ppl.ppl, 3)
    res["num_kv_blocks"] = llm.engine.get_stats().num_kv_blocks
    res["decode_tok_s"] = round(decode_speed(llm, 1, args.decode_tokens), 1)
    res[f"throughput_{args.batch}_tok_s"] = round(decode_speed(llm, args.batch,
                                                               args.decode_tokens), 1)
    return res


def markdown(rows: list[Row], batch: int) -> str:
    base = next((r.results.get("ppl") for r in rows if r.name == "float32"), None)
    lines = ["| method | weights MB | PPL | vs float | linears GB/s (1 row) | decode tok/s "
             f"| {batch}-stream tok/s | KV blocks (0.25 GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r.results
        if not x:
            continue
        rel = f"{(x['ppl'] / base - 1) * 100:+.2f}%" if base else ""
        lines.append(f"| {r.name} | {x['weight_mb']} | {x['ppl']} | {rel} | "
                     f"{x['kernel_gb_s']} | {x['decode_tok_s']} | "
                     f"{x[f'throughput_{batch}_tok_s']} | {x['num_kv_blocks']} |")
    return "\n".join(lines)


def run_table(args: argparse.Namespace) -> int:
    """Measure the selected rows, print and save the table."""
    rows = ROWS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        unknown = set(wanted) - {r.name for r in ROWS}
        if unknown:
            raise ValueError(f"--methods: unknown rows {sorted(unknown)}; rows are "
                             f"{[r.name for r in ROWS]}")
        rows = [r for r in ROWS if r.name in wanted]
    os.makedirs(args.out, exist_ok=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="peregrine-quant-")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(args.out, "quantization.json")
    saved: dict = {"meta": {}, "rows": {}}
    if os.path.isfile(path):  # rows measured by an earlier run (a --methods subset) stay
        with open(path) as f:
            saved = json.load(f)
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in rows:
        t = time.perf_counter()
        row.results = measure(row, args, work)
        row.results["seconds"] = round(time.perf_counter() - t, 1)
        row.results["load_avg_1m"] = round(os.getloadavg()[0], 1)
        print(json.dumps({"row": row.name, **row.results}), flush=True)
        saved["rows"][row.name] = row.results
        saved["meta"] = {"threads": torch.get_num_threads(), "ppl_tokens": args.ppl_tokens,
                         "decode_tokens": args.decode_tokens, "batch": args.batch,
                         "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(path, "w") as f:
            json.dump(saved, f, indent=2)
    for row in ROWS:
        row.results = saved["rows"].get(row.name, {})
    table = markdown(ROWS, args.batch)
    with open(os.path.join(args.out, "quantization.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0
