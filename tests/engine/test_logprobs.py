"""Logprobs and prompt logprobs are log_softmax of the model's raw logits, position by
position, whatever sampling, chunking or prefix caching does."""

from __future__ import annotations

import math
import random

import pytest
import torch

from peregrine import SamplingParams
from peregrine.attention_backend import AttentionMetadata
from tests.conftest import make_tiny_llm


def direct_logprobs(llm, ids: list[int]) -> torch.Tensor:
    """log_softmax of one uncached forward pass over `ids` (position p predicts p + 1)."""
    model = llm.engine.loaded.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       AttentionMetadata.prefill_only([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden), dim=-1)  # float32, as served


def check_entry(entry: dict, token: int, lp: torch.Tensor, num: int, atol: float) -> None:
    """One position's dict: the token's own logprob and rank plus the top-num, all from lp."""
    assert entry[token].logprob == pytest.approx(lp[token].item(), abs=atol)
    above = int((lp > lp[token] + atol).sum())
    assert above < entry[token].rank <= int((lp >= lp[token] - atol).sum())
    top = lp.topk(num)
    for rank, (tok, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
        assert entry[tok].logprob == pytest.approx(value, abs=atol)
        assert entry[tok].rank == rank or tok == token
    assert len(entry) in (num, num + 1)


@pytest.mark.parametrize("settings", [dict(), dict(max_num_batched_tokens=5)],
                         ids=["one-chunk", "chunked-prefill"])
def test_logprobs_equal_a_direct_forward(tiny_model_dir, settings):
    llm = make_tiny_llm(tiny_model_dir, **settings)
    rng = random.Random(0)
    prompt = [rng.randrange(512) for _ in range(19)]
    sp = SamplingParams(temperature=0.8, top_k=40, seed=3, max_tokens=9, ignore_eos=True,
                        logprobs=4, prompt_logprobs=3, frequency_penalty=1.0)
    out = llm.generate({"prompt_token_ids": prompt}, sp)[0]
    gen = out.outputs[0]
    lp = direct_logprobs(llm, prompt + gen.token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        check_entry(out.prompt_logprobs[p], prompt[p], lp[p - 1], 3, 1e-6)
    assert len(gen.logprobs) == len(gen.token_ids)
    total = 0.0
    for i, tok in enumerate(gen.token_ids):
        check_entry(gen.logprobs[i], tok, lp[len(prompt) + i - 1], 4, 1e-6)
        total += lp[len(prompt) + i - 1, tok].item()
    assert gen.cumulative_logprob == pytest.approx(total, abs=1e-6)


def test_prompt_logprobs_do_not_skip_prompt_tokens_via_the_prefix_cache(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, max_num_batched_tokens=8)
    prompt = {"prompt_token_ids": [(31 * i) % 512 for i in range(40)]}
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    asks = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    first = llm.generate(prompt, asks)[0]
    cached = llm.generate(prompt, plain)[0]
    assert cached.num_cached_tokens == 36 and cached.prompt_logprobs is None
    again = llm.generate(prompt, asks)[0]  # the same prompt, fully cached, asks again
    assert again.num_cached_tokens == 0
    assert again.prompt_logprobs == first.prompt_logprobs
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == cached.outputs[0].token_ids


def test_n_samples_with_prompt_logprobs(tiny_model_dir):
    """The prompt logprobs are computed once, by the first sample; its siblings still share
    the prompt's blocks through the prefix cache."""
    llm = make_tiny_llm(tiny_model_dir)
    prompt = [(7 * i + 3) % 512 for i in range(26)]
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=4,
                                      ignore_eos=True, prompt_logprobs=0))[0]
    lp = direct_logprobs(llm, prompt)
    assert len(out.prompt_logprobs) == len(prompt) and len(out.outputs) == 3
    for p in range(1, len(prompt)):
        assert list(out.prompt_logprobs[p]) == [prompt[p]]
        want = lp[p - 1, prompt[p]].item()
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want)
    assert out.num_cached_tokens == 24  # the siblings hit the first sample's full blocks


def test_greedy_logprobs_on_the_real_model_match_transformers(smollm2_float_llm,
                                                              hf_smollm2):
    hf_model, _ = hf_smollm2
    tok = smollm2_float_llm.get_tokenizer()
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of Italy?"}])
    sp = SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=5)
    out = smollm2_float_llm.generate({"prompt_token_ids": prompt}, sp)[0]
    gen = out.outputs[0]
    ids = prompt + gen.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), dim=-1)
    n = len(prompt)
    for p in range(1, n):
        for tok_id, entry in out.prompt_logprobs[p].items():
            assert entry.logprob == pytest.approx(ref[p - 1, tok_id].item(), abs=2e-3)
    for i, tok_id in enumerate(gen.token_ids):
        entry = gen.logprobs[i]
        assert entry[tok_id].rank == 1  # greedy picks the most likely token
        for t, e in entry.items():
            assert e.logprob == pytest.approx(ref[n + i - 1, t].item(), abs=2e-3)
            assert e.decoded_token == tok.decode([t])
    assert math.isclose(gen.cumulative_logprob, sum(gen.logprobs[i][t].logprob
                                                    for i, t in enumerate(gen.token_ids)))


def test_logprobs_above_the_engine_maximum_are_rejected(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, max_logprobs=5)
    with pytest.raises(ValueError, match=r"logprobs must be <= 5"):
        llm.generate([1, 2, 3], SamplingParams(logprobs=6))
    with pytest.raises(ValueError, match=r"prompt_logprobs must be <= 5"):
        llm.generate([1, 2, 3], SamplingParams(prompt_logprobs=6))
    assert not llm.engine.has_unfinished_requests()
