"""Sampler cost per step: greedy vs temperature/top-p vs penalties, on a [B, V] batch.

    .venv/bin/python scripts/bench_sampler.py [--batch 64] [--vocab 49152] [--device cpu]

Times the whole sampling path of one engine step (building the sampling tensors from
Sequence objects, then Sampler.forward, results read back to the host), the median and the
minimum of --repeats runs (on a shared machine the minimum is the better estimate of the
cost itself), and writes the numbers as JSON and a markdown table under --out."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from peregrine.engine.sampling_metadata import build_sampling_tensors
from peregrine.engine.sequence import Request, Sequence
from peregrine.sampling.sampler import Sampler
from peregrine.sampling_params import SamplingParams

CASES: dict[str, dict] = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=0.8),
    "temperature+top_p": dict(temperature=0.8, top_p=0.95),
    "temperature+top_k": dict(temperature=0.8, top_k=50),
    "top_k+top_p+min_p": dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.05),
    "seeded (a seed per request)": dict(temperature=0.8, top_p=0.95, seed=0),
    "penalties (rep+freq+pres)": dict(temperature=0.8, top_p=0.95, repetition_penalty=1.1,
                                      frequency_penalty=0.5, presence_penalty=0.5),
    "greedy + penalties": dict(temperature=0, repetition_penalty=1.2),
    "logit_bias + min_tokens": dict(temperature=0.8, logit_bias={i: 1.0 for i in range(10)},
                                    min_tokens=1000, max_tokens=2000),
    "logprobs=5": dict(temperature=0.8, top_p=0.95, logprobs=5),
}


def make_batch(params: SamplingParams, batch: int, vocab: int, prompt_len: int,
               output_len: int) -> list[Sequence]:
    rng = random.Random(0)
    seqs = []
    for i in range(batch):
        p = params.clone()
        if p.seed is not None:
            p.seed = i
        req = Request(str(i), None, [rng.randrange(vocab) for _ in range(prompt_len)], p,
                      eos_token_ids=[0])
        seq = Sequence(req, 0, p)
        seq.token_ids += [rng.randrange(vocab) for _ in range(output_len)]
        seqs.append(seq)
    return seqs


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    """`batch` varied chat prompts (token ids)."""
    topics = ["cats", "the sea", "Python", "rain", "Paris", "music", "chess", "bread"]
    asks = ["Write a sentence about", "Tell me a fact about", "Write a poem about",
            "Explain", "Give three words about", "Describe", "Ask a question about",
            "Start a story about"]
    ids = [tokenizer.encode_chat([{"role": "user", "content": f"{a} {t}."}])
           for a in asks for t in topics]
    return (ids * (batch // len(ids) + 1))[:batch]


def real_logits(batch: int, device: torch.device) -> torch.Tensor:
    """Next-token logits of SmolLM2-135M-Instruct (the embedded model) after `batch` varied
    chat prompts: the peaked distributions top-p meets in practice."""
    from peregrine.attention_backend import AttentionMetadata
    from peregrine.models.loader import load_model
    loaded = load_model(None, device=device)
    ids = chat_prompts(loaded.tokenizer, batch)
    flat = torch.tensor([t for s in ids for t in s], device=device)
    pos = torch.cat([torch.arange(len(s)) for s in ids]).to(device)
    meta = AttentionMetadata.prefill_only([len(s) for s in ids], device)
    with torch.inference_mode():
        hidden = loaded.model(flat, pos, meta)
        last = torch.tensor([len(s) for s in ids], device=device).cumsum(0) - 1
        return loaded.model.compute_logits(hidden[last])


def time_case(params: SamplingParams, args: argparse.Namespace, device: torch.device,
              logits: torch.Tensor) -> tuple[float, float]:
    seqs = make_batch(params, args.batch, args.vocab, args.prompt_len, args.output_len)
    sampler = Sampler()
    rng = random.Random(0)
    times = []
    for i in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        st = build_sampling_tensors(seqs, args.vocab, device, rng)
        sampler(logits, st)  # reads the tokens back to the host: includes the sync
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, min(times) * 1000


ENGINE_CASES = ["greedy", "temperature+top_p", "penalties (rep+freq+pres)", "logprobs=5"]


def engine_step_times(args: argparse.Namespace) -> list[dict]:
    """Whole engine decode steps (SmolLM2, `--batch` sequences) under a few of the cases:
    the sampler's share of a real step."""
    from peregrine import LLM
    llm = LLM(max_num_seqs=args.batch, kv_cache_memory=1.0)
    prompts = [{"prompt_token_ids": p} for p in chat_prompts(llm.get_tokenizer(), args.batch)]
    rows = []
    for name in ENGINE_CASES:
        params = SamplingParams(**{**CASES[name], "max_tokens": 1000, "ignore_eos": True})
        ids = [llm.add_request(p, params) for p in prompts]
        while llm.engine.scheduler.waiting or any(  # until every prompt is prefilled
                s.is_prefilling for s in llm.engine.scheduler.running):
            llm.step()
        times = []
        for _ in range(args.engine_steps):
            t0 = time.perf_counter()
            llm.step()
            times.append((time.perf_counter() - t0) * 1000)
        for rid in ids:
            llm.abort(rid)
        rows.append({"case": name, "step_ms": round(statistics.median(times), 2),
                     "min_step_ms": round(min(times), 2)})
        print(f"engine step, {name:28s} median {rows[-1]['step_ms']:8.2f} ms   "
              f"min {rows[-1]['min_step_ms']:8.2f} ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--logits", choices=["real", "random"], default="real",
                    help="real: SmolLM2's next-token logits (vocab 49152); random: N(0, 1)")
    ap.add_argument("--engine-steps", type=int, default=0,
                    help="also time this many whole engine decode steps per case (SmolLM2)")
    ap.add_argument("--out", default="docs/bench-results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.logits == "real":
        logits = real_logits(args.batch, device)
        args.vocab = logits.shape[1]
    else:
        logits = torch.randn(args.batch, args.vocab, device=device)
    rows = []
    with torch.inference_mode():
        for name, kw in CASES.items():
            ms, best = time_case(SamplingParams(**kw), args, device, logits)
            rows.append({"case": name, "ms_per_step": round(ms, 3), "min_ms": round(best, 3)})
            print(f"{name:32s} median {ms:8.2f} ms   min {best:8.2f} ms")
    for key in ("ms_per_step", "min_ms"):
        for r in rows:
            r[f"{key}_vs_greedy"] = round(r[key] / rows[0][key], 2)
    meta = {"batch": args.batch, "vocab": args.vocab, "logits": args.logits,
            "prompt_len": args.prompt_len, "output_len": args.output_len, "device": str(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    engine = engine_step_times(args) if args.engine_steps else []
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sampler.json"), "w") as f:
        json.dump({"meta": meta, "results": rows, "engine_steps": engine}, f, indent=1)
    lines = [f"Sampler per step, batch {args.batch} x vocab {args.vocab} ({args.logits} "
             f"logits) on {device} "
             f"({torch.get_num_threads()} threads), prompt {args.prompt_len} + output "
             f"{args.output_len} tokens per row; median and min of {args.repeats} steps", "",
             "| case | median ms / step | vs greedy | min ms / step | vs greedy |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['ms_per_step']:.2f} | {r['ms_per_step_vs_greedy']:.2f}x "
              f"| {r['min_ms']:.2f} | {r['min_ms_vs_greedy']:.2f}x |" for r in rows]
    if engine:
        lines += ["", f"Whole engine decode step, SmolLM2-135M, {args.batch} sequences "
                  f"(median and min of {args.engine_steps} steps)", "",
                  "| case | median ms / step | min ms / step |", "|---|---:|---:|"]
        lines += [f"| {r['case']} | {r['step_ms']:.2f} | {r['min_step_ms']:.2f} |"
                  for r in engine]
    with open(os.path.join(args.out, "sampler.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
