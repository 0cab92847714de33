"""What batched LoRA costs: decode tokens/s of a batch of 16 rows on SmolLM2-135M with 1, 4
and 16 distinct adapters (rank 8 and 16) against the base model alone, and the time to
load an adapter.

    .venv/bin/python scripts/bench_lora.py [--rows 16] [--prompt-tokens 32] [--tokens 32]
        [--quantization auto] [--threads N] [--out docs/bench-results/lora.json]

Offline, in one process: the engine the server runs (`LLM`), driven step by step; decode
tokens/s counts the steps in which every row decodes (prefill steps excluded). Rows are
spread evenly over the adapters (16 rows, 4 adapters: 4 rows each). The adapters are random
PEFT adapters on every linear (q, k, v, o, gate, up, down) of a transformers model with
SmolLM2's shapes (random weights: the speed does not depend on them). Baselines: the base
model with LoRA off (the fused CPU step on the GGUF's blocks, what a server without
adapters runs), and with LoRA on but no adapter in the batch (the eager modules, which
every LoRA step runs). Prints a markdown table and saves it with the machine as JSON."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from peregrine import LLM, LoRARequest, SamplingParams  # noqa: E402


def machine() -> dict[str, Any]:
    """The CPU model and its SIMD flags, the core count, threads, versions and load."""
    import platform
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = sorted(f for f in flags if f in ("avx2", "fma") or f.startswith("avx512"))
    return {"cpu": fields.get("Model name", platform.processor()).strip(), "simd": simd,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": os.getloadavg()}


def make_adapters(llm: LLM, root: str, rank: int, count: int) -> list[LoRARequest]:
    """`count` random PEFT adapters of rank `rank` with the served model's shapes."""
    import peft
    import transformers
    cfg = llm.engine.model_config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(hf_cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = []
    for i in range(count):
        model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                          target_modules=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():  # peft starts B at zero; random A and B make a real delta
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        path = os.path.join(root, f"r{rank}-{i}")
        model.save_pretrained(path)
        base = model.unload()  # the plain base again, for the next adapter
        out.append(LoRARequest(f"r{rank}-{i}", path))
    return out


def decode_rate(llm: LLM, prompts: list[list[int]], tokens: int,
                loras: list[LoRARequest | None]) -> float:
    """Decode tokens/s of the rows run together to `tokens` generated tokens each."""
    engine = llm.engine
    decoding = [False]
    engine.batch_observer = lambda b: decoding.__setitem__(
        0, b.num_decodes == len(b.seqs))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for p, lora in zip(prompts, loras):
        llm.add_request({"prompt_token_ids": p}, params, lora_request=lora)
    rows, seconds = 0, 0.0
    while engine.has_unfinished_requests():
        running = len(engine.scheduler.running) + len(engine.scheduler.waiting)
        t0 = time.perf_counter()
        llm.step()
        dt = time.perf_counter() - t0
        if decoding[0]:
            rows, seconds = rows + running, seconds + dt
    engine.batch_observer = None
    return rows / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (median kept)")
    ap.add_argument("--quantization", default="auto",
                    help="the base model's weights (auto: the GGUF's own blocks)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="docs/bench-results/lora.json")
    ns = ap.parse_args()
    common = dict(quantization=ns.quantization, kv_cache_memory=0.25, num_threads=ns.threads,
                  enable_prefix_caching=False)
    plain = LLM(**common)
    llm = LLM(enable_lora=True, max_loras=max(ns.adapters), max_lora_rank=max(ns.ranks),
              **common)
    g = torch.Generator().manual_seed(0)
    vocab = llm.engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (ns.prompt_tokens,), generator=g).tolist()
               for _ in range(ns.rows)]

    def measure(target: LLM, loras: list[LoRARequest | None]) -> float:
        decode_rate(target, prompts, 4, loras)  # warm-up (and slot loads)
        return statistics.median(decode_rate(target, prompts, ns.tokens, loras)
                                 for _ in range(ns.repeats))

    results: list[dict[str, Any]] = []

    def record(case: str, rank: int | None, adapters: int, rate: float) -> None:
        results.append({"case": case, "rank": rank, "adapters": adapters,
                        "decode_tok_s": round(rate, 1)})
        print(f"{case:<28} rank {rank or '-':>2}  adapters {adapters:>2}  "
              f"{rate:8.1f} tok/s", flush=True)

    record("base, LoRA off", None, 0, measure(plain, [None] * ns.rows))
    record("base, LoRA on", None, 0, measure(llm, [None] * ns.rows))
    loads: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for rank in ns.ranks:
            adapters = make_adapters(llm, root, rank, max(ns.adapters))
            reads, copies = [], []
            for lora in adapters:  # read from disk, then copied into a slot
                t0 = time.perf_counter()
                llm.engine.add_lora(lora)
                t1 = time.perf_counter()
                llm.engine.lora.activate({lora.lora_name})
                reads.append(t1 - t0)
                copies.append(time.perf_counter() - t1)
            loads[rank] = {"read_s": statistics.median(reads),
                           "slot_copy_s": statistics.median(copies),
                           "bytes": llm.engine.lora.adapters[adapters[0].lora_name].nbytes}
            for k in ns.adapters:
                loras = [adapters[i * k // ns.rows] for i in range(ns.rows)]
                record(f"{k} adapter(s)", rank, k, measure(llm, loras))
            for lora in adapters:
                llm.engine.remove_lora(lora.lora_name)
    report = {"machine": machine(), "rows": ns.rows, "prompt_tokens": ns.prompt_tokens,
              "tokens": ns.tokens, "quantization": ns.quantization, "results": results,
              "adapter_load": loads, "command": " ".join(sys.argv)}
    base = results[0]["decode_tok_s"]
    print("\n| case | rank | decode tok/s | vs LoRA off |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['rank'] or '-'} | {r['decode_tok_s']} | "
              f"{r['decode_tok_s'] / base:.2f}x |")
    for rank, v in loads.items():
        print(f"rank {rank}: adapter read {v['read_s'] * 1000:.1f} ms, slot copy "
              f"{v['slot_copy_s'] * 1000:.1f} ms, {v['bytes'] / 2**20:.1f} MiB")
    os.makedirs(os.path.dirname(ns.out) or ".", exist_ok=True)
    with open(ns.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"saved {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
