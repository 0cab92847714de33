"""Sizing the KV pool on a GPU: measure the peak memory of the largest step, give the KV
pool what gpu_memory_utilization leaves.

The largest step is a forward over the whole token budget of dummy tokens (as prompts of
at most max_model_len tokens, no KV cache) followed by sampling-sized logits; its peak is
read from torch's allocator. Memory torch does not manage (the CUDA context, other
processes) is what the device reports used beyond torch's own reservation. CUDA graphs are
captured after the pool is allocated; the (1 - utilization) margin absorbs them."""

from __future__ import annotations

import torch

from peregrine.attention_backend import AttentionMetadata, get_attention_backend
from peregrine.config import EngineConfig
from peregrine.models.llama import LlamaForCausalLM


def profile_lengths(num_tokens: int, max_len: int) -> list[int]:
    """The dummy batch: `num_tokens` tokens as prompts of at most `max_len` tokens."""
    full, rest = divmod(num_tokens, max_len)
    return [max_len] * full + ([rest] if rest else [])


@torch.inference_mode()
def profile_forward(model: LlamaForCausalLM, num_tokens: int, max_len: int, logit_rows: int,
                    device: torch.device) -> None:
    """One forward over `num_tokens` dummy tokens without a KV cache, then the logits,
    softmax and sort of `logit_rows` rows (the sampler's largest tensors)."""
    lens = profile_lengths(num_tokens, max_len)
    meta = AttentionMetadata.prefill_only(lens, device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    hidden = model(ids, positions, meta, None)
    logits = model.compute_logits(hidden[:logit_rows])
    torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)


def kv_budget_bytes(total: int, peak_torch: int, non_torch: int, utilization: float) -> float:
    """Bytes left to the KV pool: utilization x device memory, minus torch's peak (weights
    plus the largest step's activations), minus memory outside torch's allocator."""
    return utilization * total - peak_torch - non_torch


def gpu_kv_budget(model: LlamaForCausalLM, config: EngineConfig, max_model_len: int) -> float:
    """Profile the largest step on the GPU and return the KV pool's budget in bytes."""
    device = config.torch_device
    model.set_attention_backend(get_attention_backend(config.attention_backend, device,
                                                       model.config))
    tokens = config.token_budget
    if not config.enable_chunked_prefill:  # the scheduler then runs whole prompts
        tokens = max(tokens, max_model_len)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_forward(model, tokens, max_model_len, min(config.max_num_seqs, tokens), device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    return kv_budget_bytes(total, peak, non_torch, config.gpu_memory_utilization)
