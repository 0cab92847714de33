"""Sliding-window perplexity, run through the paged KV cache (so a quantized cache counts).

Each window of `context` tokens starts a fresh sequence; its tokens go through the model in
chunks of `chunk` tokens, every chunk reading the K/V of the earlier ones back from the
cache (int8/fp8 when the cache is quantized). Windows advance by `stride`; a window scores
only the tokens the previous one did not (the Hugging Face protocol), so with stride <
context every scored token sees at least context - stride tokens of history."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from peregrine.attention_backend import AttentionMetadata, allocate_kv_pool
from peregrine.models.llama import LlamaForCausalLM


@dataclass
class PerplexityResult:
    """Perplexity and what it was measured over."""

    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    num_tokens: int  # scored tokens
    num_windows: int
    seconds: float


def window_nll(net: LlamaForCausalLM, ids: torch.Tensor, first_scored: int,
               kv_cache_dtype: str = "auto", chunk: int = 128, block_size: int = 16
               ) -> tuple[float, int]:
    """Sum of NLL of ids[t] given ids[:t] for t in [first_scored, len), and that count."""
    cfg = net.config
    n = ids.numel()
    dtype, device = net.embed_tokens.weight.dtype, ids.device
    num_blocks = -(-n // block_size)
    caches = allocate_kv_pool(cfg, num_blocks, block_size, dtype, device, kv_cache_dtype)
    table = torch.arange(num_blocks, dtype=torch.int32, device=device).unsqueeze(0)
    total, count = 0.0, 0
    for s in range(0, n - 1, chunk):
        e = min(s + chunk, n - 1)  # the last token is only a target
        positions = torch.arange(s, e, device=device)
        meta = AttentionMetadata.build([0, e - s], [e], 0, positions, table, device)
        lo = max(first_scored - 1, s)  # predictions at positions lo..e-1 are scored
        if lo >= e:
            net(ids[s:e], positions, meta, caches)  # context only: fill the cache
            continue
        hidden = net(ids[s:e], positions, meta, caches)
        logits = net.compute_logits(hidden[lo - s:])
        targets = ids[lo + 1:e + 1]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        total += float(nll)
        count += targets.numel()
    return total, count


@torch.inference_mode()
def perplexity(net: LlamaForCausalLM, ids: list[int], context: int = 1024,
               stride: int | None = None, kv_cache_dtype: str = "auto", chunk: int = 128
               ) -> PerplexityResult:
    """Perplexity of `ids` under `net` with sliding windows (deterministic)."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    stride = stride or context
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = net.embed_tokens.weight.device
    tokens = torch.tensor(ids, device=device)
    t0 = time.perf_counter()
    total, count, windows, scored_to = 0.0, 0, 0, 1  # token 0 is never a target
    begin = 0
    while scored_to < len(ids):
        end = min(begin + context, len(ids))
        nll, n = window_nll(net, tokens[begin:end], scored_to - begin, kv_cache_dtype, chunk)
        total, count, windows, scored_to = total + nll, count + n, windows + 1, end
        begin += stride
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, windows, time.perf_counter() - t0)
