"""Shared checks that a peregrine model equals transformers' on a tiny random checkpoint:
logits of a flat batch, and the engine's greedy tokens (alone, batched, chunked) against
transformers' own cached `generate`."""

from __future__ import annotations

import torch

from peregrine import LLM, SamplingParams
from peregrine.attention_backend import AttentionMetadata
from peregrine.models.loader import load_model


def random_prompts(lengths: list[int], vocab: int = 256, seed: int = 1) -> list[list[int]]:
    """Random token ids, one prompt per length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


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
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, attention_mask=torch.ones(1, len(prompt),
                                                                      dtype=torch.long))
    return out[0, len(prompt):].tolist()


def engine_greedy(path: str, prompts: list[list[int]], n: int, **engine: object
                  ) -> list[list[int]]:
    """The engine's greedy tokens for `prompts` submitted together, in float64."""
    llm = LLM(path, **{"dtype": "float64", "block_size": 4, "num_kv_blocks": 256, **engine})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    llm.engine.check_invariants()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    return [o.outputs[0].token_ids for o in outs]


def assert_greedy_matches(path: str, ref: torch.nn.Module, n: int = 32) -> None:
    """The engine's greedy tokens equal transformers' generate (float64) for a prompt run
    alone, in a batch of four, and prefilled in chunks of 5 tokens."""
    ref = ref.double()
    prompts = random_prompts([21, 9, 30, 14], seed=7)
    want = hf_generate(ref, prompts[0], n)
    assert engine_greedy(path, prompts[:1], n)[0] == want
    batched = engine_greedy(path, prompts, n)
    assert batched[0] == want
    assert batched[1:] == [hf_generate(ref, p, n) for p in prompts[1:]]
    chunked = engine_greedy(path, prompts, n, max_num_batched_tokens=5)
    assert chunked == batched
