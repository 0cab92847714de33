"""Batching, chunked prefill, preemption and prefix caching never change greedy output."""

from __future__ import annotations

import random

import pytest

from peregrine import SamplingParams
from tests.conftest import make_tiny_llm


def workload(n: int, seed: int = 0, vocab: int = 512) -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(seed)
    # Shared stems make prefix-cache hits likely; lengths span many blocks.
    stems = [[rng.randrange(vocab) for _ in range(rng.randrange(8, 40))] for _ in range(4)]
    prompts, params = [], []
    for _ in range(n):
        tail = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        prompts.append({"prompt_token_ids": rng.choice(stems) + tail})
        params.append(SamplingParams(temperature=0, max_tokens=rng.randrange(4, 24),
                                     ignore_eos=True))
    return prompts, params


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Every request of the workload run alone, prefix caching off."""
    prompts, params = workload(64)
    llm = make_tiny_llm(tiny_model_dir, enable_prefix_caching=False)
    return [llm.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]


SETTINGS = {
    "batched": dict(),
    "no-chunking": dict(enable_chunked_prefill=False),
    "tiny-budget-chunks": dict(max_num_batched_tokens=7),
    "tiny-pool-preempts": dict(num_kv_blocks=40, max_num_batched_tokens=33),
    "no-prefix-cache": dict(enable_prefix_caching=False, max_num_batched_tokens=64),
    "few-seqs": dict(max_num_seqs=3),
    "static": dict(batching="static", max_num_seqs=16),
    "dynamic": dict(batching="dynamic", max_num_seqs=16, batch_wait_ms=0),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_batch_of_64_matches_alone(tiny_model_dir, reference, name):
    prompts, params = workload(64)
    llm = make_tiny_llm(tiny_model_dir, **SETTINGS[name])
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == reference
    llm.engine.check_invariants()
    stats = llm.engine.get_stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0
    if name == "tiny-pool-preempts":
        assert stats.num_preemptions > 0


def test_prefix_cache_reuse_is_counted_and_exact(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir)
    rng = random.Random(1)
    prefix = [rng.randrange(512) for _ in range(64)]
    a = {"prompt_token_ids": prefix + [1, 2, 3]}
    b = {"prompt_token_ids": prefix + [4, 5]}
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(a, sp)
    before = llm.engine.get_stats().prefix_cache_hits
    out_b = llm.generate(b, sp)[0]
    hits = llm.engine.get_stats().prefix_cache_hits - before
    assert hits == 64 and out_b.num_cached_tokens == 64  # 16 full blocks of 4
    fresh = make_tiny_llm(tiny_model_dir, enable_prefix_caching=False).generate(b, sp)[0]
    assert out_b.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_real_model_batch_matches_alone(smollm2_llm):
    """SmolLM2 in float32: 12 varied chats batched with chunking equal each run alone."""
    tok = smollm2_llm.get_tokenizer()
    questions = ["Name a planet.", "What is 2+2?", "Say hello in French.",
                 "Write one sentence about cats.", "What color is the sky?",
                 "Give me a word that rhymes with tree.", "Who wrote Hamlet?",
                 "What is the boiling point of water?", "Count from 1 to 5.",
                 "Describe a rainy day in a sentence.", "What is Python?",
                 "Suggest a name for a dog."]
    prompts = [{"prompt_token_ids": tok.encode_chat([{"role": "user", "content": q}])}
               for q in questions]
    sp = SamplingParams(temperature=0, max_tokens=24)
    batched = smollm2_llm.generate(prompts, sp)
    for p, out in zip(prompts[:4], batched[:4]):
        alone = smollm2_llm.generate(p, sp)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    smollm2_llm.engine.check_invariants()
