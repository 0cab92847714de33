"""GPU measurements of the Triton path: kernel times, decode tok/s and MBU, offline throughput.

Run on the GPU machine from the repository root (each part fits one 10-minute call):

    python scripts/gpu_bench.py kernels     # paged decode vs SDPA, prefill vs SDPA
    python scripts/gpu_bench.py decode      # Llama-3-8B dummy bf16, batch 1/8/64/256, graphs on/off
    python scripts/gpu_bench.py throughput  # nano-vllm workload, peregrine vs transformers
    python scripts/gpu_bench.py all

Every part prints a markdown table and writes <out>/<part>.json and <out>/<part>.md
(--out, default bench/results/gpu). Times: median of CUDA-event timed runs after warm-up."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# NVIDIA datasheet peaks (dense bf16 FLOP/s, HBM bytes/s), matched against the device name.
PEAKS = [("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12), ("H200", 989e12, 4.8e12),
         ("A100", 312e12, 2.039e12)]


def device_peak() -> tuple[str, float | None, float | None]:
    """(device name, peak bf16 FLOP/s, peak bytes/s); None where the device is not listed."""
    name = torch.cuda.get_device_name()
    for key, flops, bandwidth in PEAKS:
        if key in name:
            return name, flops, bandwidth
    return name, None, None


def time_cuda(fn: Callable[[], Any], warmup: int = 5, iters: int = 30) -> float:
    """Median seconds of `fn` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def write(out_dir: str, part: str, rows: list[dict], meta: dict) -> None:
    """Print a markdown table of `rows` and save it with the JSON."""
    os.makedirs(out_dir, exist_ok=True)
    keys = list(rows[0]) if rows else []
    lines = [f"## {part} — {meta['device']} ({meta['date']})", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                       for v in r.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    with open(os.path.join(out_dir, f"{part}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, f"{part}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


# --- kernels --------------------------------------------------------------------------------------
def bench_kernels(quick: bool) -> list[dict]:
    """Paged decode (Llama-3-8B attention shapes, bf16) against SDPA on contiguous K/V, and
    the chunked-prefill kernel against SDPA's causal attention, per layer call."""
    from peregrine.kernels.triton.decode_attention import paged_decode_attention
    from peregrine.kernels.triton.prefill_attention import prefill_attention
    from peregrine.kernels.triton_attention import default_decode_tiles, default_prefill_tiles
    dev = torch.device("cuda")
    _, peak_flops, peak_bw = device_peak()
    hq, hkv, d, bs, dt = 32, 8, 128, 16, torch.bfloat16
    scale = d ** -0.5
    rows = []
    decode_shapes = [(1, 1024), (1, 8192), (8, 1024), (64, 1024), (256, 512), (256, 2048)]
    for batch, ctx in decode_shapes[:3] if quick else decode_shapes:
        nblocks = -(-ctx // bs)
        pool = batch * nblocks
        k_cache = torch.randn(pool, bs, hkv, d, device=dev, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(pool, device=dev).view(batch, nblocks).int()
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(batch, hq, d, device=dev, dtype=dt)
        out = torch.empty_like(q)
        tiles = default_decode_tiles(dev)
        t_paged = time_cuda(lambda: paged_decode_attention(
            q, k_cache, v_cache, None, None, tables, seq_lens, out, scale, None, ctx, tiles))
        k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=dt)
        v = torch.randn_like(k)
        q4 = q.view(batch, hq, 1, d)
        t_sdpa = time_cuda(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale,
                                                                  enable_gqa=True))
        kv_bytes = 2 * batch * ctx * hkv * d * 2
        rows.append({"kernel": "decode", "batch": batch, "context": ctx,
                     "ours_us": t_paged * 1e6, "sdpa_us": t_sdpa * 1e6,
                     "sdpa/ours": t_sdpa / t_paged, "ours_GB/s": kv_bytes / t_paged / 1e9,
                     "ours_MBU": kv_bytes / t_paged / peak_bw if peak_bw else "n/a"})
        del k_cache, v_cache, k, v
    for length in [512, 2048] if quick else [512, 2048, 8192]:
        q = torch.randn(length, hq, d, device=dev, dtype=dt)
        k = torch.randn(length, hkv, d, device=dev, dtype=dt)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        qsl = torch.tensor([0, length], dtype=torch.int32, device=dev)
        lens = torch.tensor([length], dtype=torch.int32, device=dev)
        tiles = default_prefill_tiles(dev)
        t_ours = time_cuda(lambda: prefill_attention(
            q, k, v, None, None, None, None, None, qsl, lens, out, 0, 1, length, scale, None,
            tiles))
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        t_sdpa = time_cuda(lambda: F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True))
        flops = 4 * hq * d * length * (length + 1) / 2
        rows.append({"kernel": "prefill", "batch": 1, "context": length,
                     "ours_us": t_ours * 1e6, "sdpa_us": t_sdpa * 1e6, "sdpa/ours": t_sdpa / t_ours,
                     "ours_TFLOP/s": flops / t_ours / 1e12,
                     "ours_MFU": flops / t_ours / peak_flops if peak_flops else "n/a"})
    return rows


# --- engine decode --------------------------------------------------------------------------------
def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per forward: every parameter except an untied embedding table."""
    emb = model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if p is not emb or model.config.tie_word_embeddings)


def bench_decode(quick: bool, model: str, prompt_len: int, steps: int) -> list[dict]:
    """Steady-state decode tok/s and MBU of the engine, with and without CUDA graphs."""
    from peregrine import LLM, SamplingParams
    _, _, peak_bw = device_peak()
    batches = [1, 8] if quick else [1, 8, 64, 256]
    rows = []
    for eager in (True, False):
        t0 = time.perf_counter()
        llm = LLM(model, load_format="dummy", dtype="bfloat16", enforce_eager=eager,
                  max_num_seqs=max(batches), max_model_len=prompt_len + steps + 64)
        init_s = time.perf_counter() - t0
        engine = llm.engine
        cfg = engine.model_config
        wbytes = weight_bytes(engine.loaded.model)
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
        rng = random.Random(0)
        for batch in batches:
            sp = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
            for i in range(batch):
                engine.add_request(f"{batch}-{i}", [rng.randrange(cfg.vocab_size)
                                                    for _ in range(prompt_len)], sp)
            while engine.scheduler.waiting or any(s.is_prefilling
                                                  for s in engine.scheduler.running):
                engine.step()
            for _ in range(3):  # warm-up decode steps
                engine.step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            step_s = (time.perf_counter() - t) / steps
            ctx = prompt_len + 3 + steps / 2  # mean context over the timed steps
            step_bytes = wbytes + batch * ctx * kv_per_token
            rows.append({"batch": batch, "cuda_graphs": not eager, "step_ms": step_s * 1e3,
                         "tok/s": batch / step_s, "MBU": step_bytes / step_s / peak_bw
                         if peak_bw else "n/a", "engine_init_s": init_s})
            for i in range(batch):
                engine.abort_request(f"{batch}-{i}")
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# --- offline throughput ---------------------------------------------------------------------------
def nano_vllm_workload(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """n requests of random tokens; prompt and output lengths uniform in [100, 1024]."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    outputs = [rng.randint(100, 1024) for _ in range(n)]
    return prompts, outputs


def bench_throughput(quick: bool, model: str, hf_batch: int) -> list[dict]:
    """Output tokens/s of the whole workload: peregrine's engine vs transformers generate
    (batched, left-padded, each batch decoding until its longest requested output)."""
    from peregrine import LLM, SamplingParams
    n = 64 if quick else 256
    rows = []
    llm = LLM(model, load_format="dummy", dtype="bfloat16")
    cfg = llm.engine.model_config
    prompts, outs = nano_vllm_workload(n, cfg.vocab_size)
    params = [SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True) for o in outs]
    llm.generate([{"prompt_token_ids": p} for p in prompts[:4]],
                 SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    rows.append({"engine": "peregrine", "requests": n, "output_tokens": produced,
                 "seconds": elapsed, "output_tok/s": produced / elapsed,
                 "total_tok/s": (produced + sum(map(len, prompts))) / elapsed})
    model_dir = llm.engine.loaded.source.path
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    rows.append(bench_transformers(model_dir, prompts, outs, hf_batch))
    return rows


def bench_transformers(model_dir: Any, prompts: list[list[int]], outs: list[int],
                       batch: int) -> dict:
    """transformers generate on the same config with random bf16 weights, sdpa attention."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    useful = 0
    torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        new = max(outs[i] for i in idx)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=True, temperature=0.6, pad_token_id=0)
        useful += sum(outs[i] for i in idx)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    return {"engine": f"transformers generate (batch {batch})", "requests": len(prompts),
            "output_tokens": useful, "seconds": elapsed, "output_tok/s": useful / elapsed,
            "total_tok/s": (useful + sum(map(len, prompts))) / elapsed}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["kernels", "decode", "throughput", "all"])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument("--model", default="llama-3-8b", help="shipped config, run with dummy weights")
    ap.add_argument("--prompt-len", type=int, default=512, help="decode: context before timing")
    ap.add_argument("--steps", type=int, default=64, help="decode: timed steps per batch size")
    ap.add_argument("--hf-batch", type=int, default=64, help="throughput: transformers batch")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and requests")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA device")
    import triton
    name, _, _ = device_peak()
    meta = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": triton.__version__, "quick": args.quick}
    parts = ["kernels", "decode", "throughput"] if args.part == "all" else [args.part]
    for part in parts:
        if part == "kernels":
            rows = bench_kernels(args.quick)
        elif part == "decode":
            rows = bench_decode(args.quick, args.model, args.prompt_len, args.steps)
        else:
            rows = bench_throughput(args.quick, args.model, args.hf_batch)
        write(args.out, part, rows, {**meta, "model": args.model})


if __name__ == "__main__":
    main()
