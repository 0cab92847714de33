"""Seeds make sampling reproducible whatever the batch; n samples share the prompt's KV blocks
and use seed + index; best_of returns the n samples of highest cumulative logprob."""

from __future__ import annotations

import random

import pytest

from peregrine import SamplingParams
from tests.conftest import assert_engine_drained, make_tiny_llm
from tests.engine.test_batching_invariance import SETTINGS


def tiny_prompt(seed: int, length: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(512) for _ in range(length)]}


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, max_tokens=20, seed=1234,
                        ignore_eos=True, repetition_penalty=1.1, presence_penalty=0.3)


def noisy_neighbours(count: int) -> tuple[list[dict], list[SamplingParams]]:
    """Other requests of every kind: greedy, unseeded, seeded, long prompts."""
    rng = random.Random(7)
    prompts, params = [], []
    for i in range(count):
        prompts.append(tiny_prompt(100 + i, rng.randrange(3, 60)))
        params.append(rng.choice([
            SamplingParams(temperature=0, max_tokens=rng.randrange(2, 30), ignore_eos=True),
            SamplingParams(temperature=1.0, max_tokens=rng.randrange(2, 30), ignore_eos=True),
            SamplingParams(temperature=0.5, seed=i, min_p=0.1, max_tokens=12, ignore_eos=True),
            SamplingParams(n=2, temperature=1.2, max_tokens=8, ignore_eos=True, logprobs=2)]))
    return prompts, params


@pytest.fixture(scope="module")
def tiny_alone(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, enable_prefix_caching=False)
    return llm.generate(tiny_prompt(0, 37), SEEDED)[0].outputs[0].token_ids


@pytest.mark.parametrize("name", ["batched", "tiny-budget-chunks", "tiny-pool-preempts"])
def test_seeded_request_is_the_same_alone_or_in_any_batch(tiny_model_dir, tiny_alone, name):
    llm = make_tiny_llm(tiny_model_dir, **SETTINGS[name])
    prompts, params = noisy_neighbours(8)
    prompts.insert(3, tiny_prompt(0, 37))
    params.insert(3, SEEDED)
    outs = llm.generate(prompts, params)
    assert outs[3].outputs[0].token_ids == tiny_alone
    assert_engine_drained(llm.engine)
    if name == "tiny-pool-preempts":
        assert llm.engine.get_stats().num_preemptions > 0


def test_another_seed_gives_other_tokens(tiny_model_dir, tiny_alone):
    llm = make_tiny_llm(tiny_model_dir)
    other = SamplingParams(**{**vars(SEEDED), "seed": SEEDED.seed + 1})
    assert llm.generate(tiny_prompt(0, 37), other)[0].outputs[0].token_ids != tiny_alone
    assert llm.generate(tiny_prompt(0, 37), SEEDED)[0].outputs[0].token_ids == tiny_alone


def test_real_model_seeded_text_alone_equals_in_batch(smollm2_llm):
    tok = smollm2_llm.get_tokenizer()

    def chat(q: str) -> dict:
        return {"prompt_token_ids": tok.encode_chat([{"role": "user", "content": q}])}

    sp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=2024)
    alone = smollm2_llm.generate(chat("Tell me a short story about a fox."), sp)[0]
    others = [SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=1.0, max_tokens=16),
              SamplingParams(temperature=0.7, seed=1, max_tokens=8, frequency_penalty=0.5)]
    batch = smollm2_llm.generate(
        [chat("What is 3+4?"), chat("Tell me a short story about a fox."), chat("Hi!"),
         chat("Name two rivers.")], [others[0], sp, others[1], others[2]])
    assert batch[1].outputs[0].text == alone.outputs[0].text
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_n_samples_share_the_prompt_blocks(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, block_size=4)
    engine = llm.engine
    prompt = tiny_prompt(3, 40)  # 10 full blocks of 4
    hits_before = engine.get_stats().prefix_cache_hits
    engine.add_request("n4", prompt, SamplingParams(n=4, temperature=1.0, seed=5,
                                                    max_tokens=8, ignore_eos=True))
    outs = engine.step()  # all four prefill in this one step and sample their first token
    seqs = engine.requests["n4"].seqs
    shared = seqs[0].block_table[:9]  # the last prompt token is computed by every sample
    assert all(s.block_table[:9] == shared for s in seqs)
    assert all(engine.kv.ref_counts[b] == 4 for b in shared)
    assert engine.get_stats().prefix_cache_hits - hits_before == 3 * 36
    held = engine.kv.num_blocks - engine.kv.num_free_blocks
    assert held == 9 + 4  # versus 4 * 10 without sharing
    engine.check_invariants()
    while engine.has_unfinished_requests():
        outs = engine.step() or outs
    samples = [o.token_ids for o in outs[0].outputs]
    assert len(samples) == 4 and len({tuple(s) for s in samples}) == 4
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_sample_i_uses_seed_plus_i(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir)
    prompt = tiny_prompt(4, 21)
    base = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    many = llm.generate(prompt, SamplingParams(**{**vars(base), "n": 3, "seed": 40}))[0]
    for i, out in enumerate(many.outputs):
        single = llm.generate(prompt, SamplingParams(**{**vars(base), "seed": 40 + i}))[0]
        assert out.index == i and out.token_ids == single.outputs[0].token_ids


def test_best_of_returns_the_n_most_likely_samples(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir)
    prompt = tiny_prompt(5, 17)
    kw = dict(temperature=1.0, max_tokens=8, ignore_eos=True, seed=9)
    best = llm.generate(prompt, SamplingParams(n=2, best_of=5, **kw))[0]
    every = llm.generate(prompt, SamplingParams(n=5, logprobs=0, **kw))[0]
    ranked = sorted(every.outputs, key=lambda o: o.cumulative_logprob, reverse=True)
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked[:2]]
    assert [o.index for o in best.outputs] == [0, 1]
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob
    assert best.outputs[0].logprobs is None  # asked for ranking, not for logprobs
