"""Beam search over shared KV blocks returns what a plain beam search over uncached forward
passes returns; its beams share blocks (copy-on-write for the partial one); width 1 is
greedy; and wider beams find more likely sequences than greedy on the real model."""

from __future__ import annotations

import random

import pytest
import torch

from peregrine import SamplingParams
from peregrine.attention_backend import AttentionMetadata
from tests.conftest import assert_engine_drained, make_tiny_llm
from tests.engine.test_batching_invariance import SETTINGS


def last_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       AttentionMetadata.prefill_only([len(ids)]))
        return torch.log_softmax(model.compute_logits(hidden[-1:]), dim=-1)[0]


def reference_beam_search(model, prompt: list[int], width: int, max_tokens: int,
                          stops: set[int], length_penalty: float = 1.0
                          ) -> list[tuple[list[int], float]]:
    """The same search written plainly: every beam re-runs the whole sequence, no cache."""
    def score(cum: float, n: int) -> float:
        return cum / n ** length_penalty

    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int], float]] = []
    for step in range(1, max_tokens + 1):
        cands = []
        for toks, cum in beams:
            lp = last_logprobs(model, prompt + toks)
            top = lp.topk(2 * width)
            cands += [(cum + v, toks + [t]) for t, v in zip(top.indices.tolist(),
                                                            top.values.tolist())]
        cands.sort(key=lambda c: -c[0])
        picks, seen = [], 0
        for cum, toks in cands:
            if toks[-1] in stops:
                if seen < width:
                    finished.append((score(cum, step), toks, cum))
            else:
                picks.append((toks, cum))
                if len(picks) == width:
                    break
            seen += 1
        if step == max_tokens:
            finished += [(score(cum, step), toks, cum) for toks, cum in picks]
            picks = []
        finished = sorted(finished, key=lambda f: -f[0])[:width]
        beams = picks
        if not beams or (len(finished) >= width and finished[-1][0] >= score(
                max(cum for _, cum in beams), step)):
            break
    return [(toks, cum) for _, toks, cum in finished]


def tiny_prompt(seed: int, n: int = 13) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(512) for _ in range(n)]


@pytest.mark.parametrize("width,n,length_penalty", [(3, 3, 1.0), (4, 2, 0.5), (2, 1, 2.0)])
def test_beams_equal_a_plain_uncached_beam_search(tiny_model_dir, width, n, length_penalty):
    llm = make_tiny_llm(tiny_model_dir, block_size=4)
    model = llm.engine.loaded.model
    for seed in range(2):
        prompt = tiny_prompt(seed)
        # Two common tokens end beams early, so finished hypotheses and pruning both occur.
        stops = set(llm.generate({"prompt_token_ids": prompt}, SamplingParams(
            temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids[1:])
        sp = SamplingParams(use_beam_search=True, beam_width=width, n=n, max_tokens=7,
                            ignore_eos=True, stop_token_ids=sorted(stops),
                            length_penalty=length_penalty)
        out = llm.generate({"prompt_token_ids": prompt}, sp)[0]
        want = reference_beam_search(model, prompt, width, 7, stops, length_penalty)[:n]
        assert [o.token_ids for o in out.outputs] == [toks for toks, _ in want]
        for o, (_, cum) in zip(out.outputs, want):
            assert o.cumulative_logprob == pytest.approx(cum, abs=1e-4)
        scores = [o.cumulative_logprob / len(o.token_ids) ** length_penalty for o in out.outputs]
        assert scores == sorted(scores, reverse=True)
        assert_engine_drained(llm.engine)


def test_beams_share_blocks_and_copy_only_the_partial_one(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, block_size=4)
    engine = llm.engine
    copies = []
    take = engine.kv.take_pending_copies

    def counting_take():
        got = take()
        copies.extend(got)
        return got

    engine.kv.take_pending_copies = counting_take
    engine.add_request("beam", {"prompt_token_ids": tiny_prompt(5, 22)},
                       SamplingParams(use_beam_search=True, beam_width=4, max_tokens=10,
                                      ignore_eos=True))
    most_shared = 0
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_invariants()
        live = [s for s in engine.scheduler.running if s.request.request_id == "beam"]
        references = sum(len(s.block_table) for s in live)
        distinct = len({b for s in live for b in s.block_table})
        most_shared = max(most_shared, references - distinct)
    # 4 beams over a 22-token prompt: the 5 full prompt blocks (at least) are held once.
    assert most_shared >= 3 * 5
    assert copies, "forks inside a partly filled block must copy it before writing"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("name", ["tiny-pool-preempts", "tiny-budget-chunks"])
def test_beam_search_is_the_same_in_a_busy_engine(tiny_model_dir, name):
    prompt = {"prompt_token_ids": tiny_prompt(7, 30)}
    sp = SamplingParams(use_beam_search=True, beam_width=3, n=3, max_tokens=8,
                        ignore_eos=True)
    alone = make_tiny_llm(tiny_model_dir).generate(prompt, sp)[0]
    llm = make_tiny_llm(tiny_model_dir, **SETTINGS[name])
    others = [{"prompt_token_ids": tiny_prompt(100 + i, 20 + 3 * i)} for i in range(6)]
    other_sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(others[:3] + [prompt] + others[3:],
                        [other_sp] * 3 + [sp] + [other_sp] * 3)
    assert [o.token_ids for o in outs[3].outputs] == [o.token_ids for o in alone.outputs]
    assert_engine_drained(llm.engine)
    if name == "tiny-pool-preempts":
        assert llm.engine.get_stats().num_preemptions > 0


def test_beam_width_one_is_greedy(tiny_model_dir, smollm2_llm):
    tiny = make_tiny_llm(tiny_model_dir)
    for seed in range(3):
        prompt = {"prompt_token_ids": tiny_prompt(seed)}
        greedy = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=10))[0]
        beam = tiny.generate(prompt, SamplingParams(use_beam_search=True, beam_width=1,
                                                    max_tokens=10))[0]
        assert beam.outputs[0].token_ids == greedy.outputs[0].token_ids
    tok = smollm2_llm.get_tokenizer()
    prompt = {"prompt_token_ids": tok.encode_chat([{"role": "user", "content": "Say hi."}])}
    greedy = smollm2_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0]
    beam = smollm2_llm.generate(prompt, SamplingParams(use_beam_search=True, beam_width=1,
                                                       max_tokens=12))[0]
    assert beam.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert beam.outputs[0].text == greedy.outputs[0].text


def test_wider_beams_find_more_likely_text_on_the_real_model(smollm2_float_llm):
    # The search itself is under test, scored by the model's exact logprobs: the float path
    # (on the default int8-activation path one of the 8 gains lands at exactly 0).
    smollm2_llm = smollm2_float_llm
    tok = smollm2_llm.get_tokenizer()
    questions = ["Name a planet.", "What is 2+2?", "Say hello in French.",
                 "Write one sentence about cats.", "What color is the sky?",
                 "Who wrote Hamlet?", "What is Python?", "Suggest a name for a dog."]
    prompts = [{"prompt_token_ids": tok.encode_chat([{"role": "user", "content": q}])}
               for q in questions]
    greedy = smollm2_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10,
                                                          ignore_eos=True, logprobs=0))
    beams = smollm2_llm.generate(prompts, SamplingParams(use_beam_search=True, beam_width=4,
                                                         max_tokens=10, ignore_eos=True))
    gains = [b.outputs[0].cumulative_logprob - g.outputs[0].cumulative_logprob
             for g, b in zip(greedy, beams)]
    assert sum(gain > 1e-4 for gain in gains) >= 6, gains
    assert min(gains) > -1e-3, gains  # never worse than greedy (up to float noise)
    smollm2_llm.engine.check_invariants()
