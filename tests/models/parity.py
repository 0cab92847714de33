"""Shared checks that a peregrine model equals transformers' on a tiny random checkpoint:
logits of a flat batch, and the engine's greedy tokens (alone, batched, chunked) against
transformers' own cached `generate`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from peregrine import LLM, SamplingParams
from peregrine.attention_backend import AttentionMetadata
from peregrine.models.loader import load_model


def random_prompts(lengths: list[int], vocab: int = 256, seed: int = 1) -> list[list[int]]:
    """Random token ids, one prompt per length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def flat_logits(net: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    """Our logits of `prompts` run as one flat prefill batch."""
    meta = AttentionMetadata.prefill_only([len(s) for s in prompts])
    flat = torch.tensor([t for s in prompts for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in prompts])
    with torch.inference_mode():
        return net.compute_logits(net(flat, pos, meta))


def sharpen_attention(ref: torch.nn.Module, path: str, factor: float = 30.0) -> None:
    """Scale every query projection of `ref` by `factor` and save it to `path` again:
    random weights give near-uniform attention, which hides errors in the scores (a RoPE
    multiplier, a soft-cap)."""
    with torch.no_grad():
        for layer in ref.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_proj"):
                attn.q_proj.weight.mul_(factor)
            else:  # Phi-3: q is the first rows of the fused qkv_proj
                attn.qkv_proj.weight[:ref.config.num_attention_heads * attn.head_dim].mul_(factor)
    ref.save_pretrained(path, safe_serialization=True)


def sharpen_experts(ref: torch.nn.Module, path: str, router: float = 20.0,
                    experts: float = 4.0) -> None:
    """Scale every MoE router of `ref` by `router` and its experts by `experts`, and save
    it to `path` again: random weights route near-uniformly through experts too small to
    show in the logits, which would hide a wrong choice or weight."""
    with torch.no_grad():
        for layer in ref.model.layers:
            mlp = layer.mlp
            if hasattr(mlp, "gate"):
                mlp.gate.weight.mul_(router)
                mlp.experts.gate_up_proj.mul_(experts)
                mlp.experts.down_proj.mul_(experts)
    ref.save_pretrained(path, safe_serialization=True)


def assert_logits_match(path: str, ref: torch.nn.Module, prompts: list[list[int]],
                        atol: float = 1e-4) -> None:
    """Our float32 logits of `prompts` run as one flat batch equal `ref`'s, per sequence."""
    net = load_model(path).model
    meta = AttentionMetadata.prefill_only([len(s) for s in prompts])
    flat = torch.tensor([t for s in prompts for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in prompts])
    with torch.inference_mode():
        ours = net.compute_logits(net(flat, pos, meta)).split([len(s) for s in prompts])
    for seq, got in zip(prompts, ours):
        with torch.no_grad():
            want = ref(torch.tensor([seq])).logits[0].float()
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)


def hf_generate(ref: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy `generate` (its KV cache, its masks), running past EOS."""
    # No EOS at all (min_new_tokens would instead ban EOS, which ignore_eos does not);
    # generate falls back from its config to the model's, so both lose theirs meanwhile.
    saved = ref.generation_config.eos_token_id, ref.config.eos_token_id
    ref.generation_config.eos_token_id = ref.config.eos_token_id = None
    try:
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                               attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    finally:
        ref.generation_config.eos_token_id, ref.config.eos_token_id = saved
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


def hf_cached_greedy(ref: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation through its forward and KV cache, token by token
    (no `generate`: Phi-3's recomputes the whole cache when it crosses the original context)."""
    out, past, cur = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            res = ref(cur, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            cur = torch.tensor([[out[-1]]])
    return out


def engine_greedy(path: str, prompts: list[list[int]], n: int, **engine: object
                  ) -> list[list[int]]:
    """The engine's greedy tokens for `prompts` submitted together, in float64."""
    llm = LLM(path, **{"dtype": "float64", "block_size": 4, "num_kv_blocks": 256, **engine})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    llm.engine.check_invariants()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    return [o.outputs[0].token_ids for o in outs]


def assert_greedy_matches(path: str, ref: torch.nn.Module, n: int = 32,
                          reference: Callable[..., list[int]] = hf_generate) -> None:
    """The engine's greedy tokens equal transformers' (`reference`: generate, in float64)
    for a prompt run alone, in a batch of four, and prefilled in chunks of 5 tokens."""
    ref = ref.double()
    prompts = random_prompts([21, 9, 30, 14], seed=7)
    want = reference(ref, prompts[0], n)
    assert engine_greedy(path, prompts[:1], n)[0] == want
    batched = engine_greedy(path, prompts, n)
    assert batched[0] == want
    assert batched[1:] == [reference(ref, p, n) for p in prompts[1:]]
    chunked = engine_greedy(path, prompts, n, max_num_batched_tokens=5)
    assert chunked == batched
