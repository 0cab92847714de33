"""max_tokens, min_tokens, ignore_eos, stop_token_ids and stop strings end generation exactly
where vLLM users expect, and streamed text never shows a broken character or half a stop."""

from __future__ import annotations

import pytest

from peregrine import SamplingParams
from tests.conftest import make_tiny_llm

PROMPT = {"prompt_token_ids": [(13 * i + 5) % 512 for i in range(11)]}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return make_tiny_llm(tiny_model_dir)


@pytest.fixture(scope="module")
def free_run(tiny) -> list[int]:
    """What greedy decoding produces with no stop condition but the length."""
    return tiny.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                ignore_eos=True))[0].outputs[0].token_ids


def greedy(tiny, **kw):
    return tiny.generate(PROMPT, SamplingParams(temperature=0, **kw))[0].outputs[0]


def test_max_tokens_ends_with_length(tiny, free_run):
    out = greedy(tiny, max_tokens=5, ignore_eos=True)
    assert out.token_ids == free_run[:5] and out.finish_reason == "length"


def test_stop_token_ids_end_generation_and_are_reported(tiny, free_run):
    stop = free_run[3]
    first = free_run.index(stop)
    out = greedy(tiny, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])
    assert out.token_ids == free_run[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_min_tokens_suppresses_stop_tokens_until_reached(tiny, free_run):
    stop = free_run[1]
    out = greedy(tiny, max_tokens=12, ignore_eos=True, stop_token_ids=[stop], min_tokens=6)
    assert stop not in out.token_ids[:6]
    assert len(out.token_ids) >= 6
    assert out.token_ids[0] == free_run[0]


def test_eos_stops_unless_ignored_and_min_tokens_holds_it_back(tiny):
    eos = tiny.get_tokenizer().eos_token_ids[0]
    forced = {eos: 100.0}  # make EOS the only likely token
    out = greedy(tiny, max_tokens=8, logit_bias=forced)
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None
    out = greedy(tiny, max_tokens=8, logit_bias=forced, ignore_eos=True)
    assert out.token_ids == [eos] * 8 and out.finish_reason == "length"
    out = greedy(tiny, max_tokens=8, logit_bias=forced, min_tokens=3)
    assert len(out.token_ids) == 4 and out.token_ids[3] == eos and eos not in out.token_ids[:3]


def test_logit_bias_changes_the_greedy_choice(tiny, free_run):
    target = (free_run[0] + 1) % 512
    out = greedy(tiny, max_tokens=3, ignore_eos=True, logit_bias={target: 100.0})
    assert out.token_ids == [target] * 3


@pytest.fixture(scope="module")
def real_text(smollm2_llm):
    tok = smollm2_llm.get_tokenizer()
    prompt = {"prompt_token_ids": tok.encode_chat(
        [{"role": "user", "content": "List the first ten letters of the alphabet."}])}
    out = smollm2_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
    return prompt, out.outputs[0]


def test_real_model_stop_string_across_tokens(smollm2_llm, real_text):
    prompt, free = real_text
    tok = smollm2_llm.get_tokenizer()
    text, ids = free.text, free.token_ids
    ends = [len(tok.decode(ids[:i])) for i in range(1, len(ids) + 1)]
    # A 4-character stop string across the boundary of two tokens near the middle.
    boundary = next(e for e in ends[len(ends) // 3:] if 2 <= e <= len(text) - 2
                    and text.find(text[e - 2:e + 2]) == e - 2)
    stop = text[boundary - 2:boundary + 2]
    for include in (False, True):
        sp = SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                            include_stop_str_in_output=include)
        out = smollm2_llm.generate(prompt, sp)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == (text[:boundary + 2] if include else text[:boundary - 2])
        completing = next(i for i, e in enumerate(ends) if e >= boundary + 2)
        assert out.token_ids == ids[:completing + 1]


def test_streamed_text_only_grows_and_never_shows_half_a_stop(smollm2_llm, real_text):
    prompt, free = real_text
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    llm = smollm2_llm
    rid = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop]))
    shown = []
    final = None
    while final is None:
        for out in llm.step():
            if out.request_id == rid:
                shown.append(out.outputs[0].text)
                final = out if out.finished else None
    text = final.outputs[0].text
    assert text == free.text[:free.text.find(stop)]
    for a, b in zip(shown, shown[1:]):
        assert b.startswith(a)
    assert all("\ufffd" not in s and text.startswith(s) for s in shown)
