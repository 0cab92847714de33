"""Invalid sampling parameters are rejected with a message naming the parameter and its range;
valid ones are normalized the way OpenAI / vLLM clients send them."""

from __future__ import annotations

import pytest

from peregrine import SamplingParams

INVALID = [
    (dict(temperature=-0.1), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(top_k=2.5), "top_k must be -1"),
    (dict(min_p=1.2), r"min_p must be in \[0, 1\]"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(n=True), "n must be an integer >= 1"),
    (dict(best_of=2, n=3), r"best_of must be an integer >= n \(3\)"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=20, max_tokens=10), r"min_tokens \(20\) must be <= max_tokens \(10\)"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(frequency_penalty=2.5), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(presence_penalty=-3), r"presence_penalty must be in \[-2, 2\]"),
    (dict(logit_bias={5: 150}), r"logit_bias values must be in \[-100, 100\]"),
    (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
    (dict(stop=[""]), "stop must be a list of non-empty strings"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of token ids"),
    (dict(logprobs=-1), "logprobs must be an integer >= 0"),
    (dict(prompt_logprobs=-2), "prompt_logprobs must be an integer >= 0"),
    (dict(seed="7"), "seed must be an integer"),
    (dict(use_beam_search=True, beam_width=0), "beam_width must be an integer >= 1"),
    (dict(use_beam_search=True, beam_width=2, n=3), r"n \(3\) must be <= beam_width \(2\)"),
    (dict(use_beam_search=True, beam_width=3, best_of=4),
     r"best_of \(4\) must be <= beam_width \(3\)"),
    (dict(use_beam_search=True, top_p=0.5), "use_beam_search does not support top_p"),
    (dict(use_beam_search=True, stop=["x"]), "use_beam_search does not support stop"),
    (dict(structured="a+"), "structured must be a StructuredOutputs"),
    (dict(structured={"regex": "a", "choice": ["a"]}), "structured outputs need exactly one"),
    (dict(structured={"pattern": "a"}), "structured: .*pattern"),
    (dict(structured={"choice": []}), "choice must be a non-empty list"),
    (dict(structured={"regex": "a"}, min_tokens=3), "min_tokens must be 0 with structured"),
    (dict(structured={"regex": "a"}, use_beam_search=True),
     "use_beam_search does not support structured"),
]


@pytest.mark.parametrize("kwargs,message", INVALID, ids=[str(k) for k, _ in INVALID])
def test_invalid_values_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logprobs_are_bounded_by_the_engines_max_logprobs():
    params = SamplingParams(logprobs=21)
    params.validate()
    with pytest.raises(ValueError, match=r"logprobs must be <= 20 \(the engine's max_logprobs\)"):
        params.validate(max_logprobs=20)
    with pytest.raises(ValueError, match="prompt_logprobs must be <= 5"):
        SamplingParams(prompt_logprobs=6).validate(max_logprobs=5)


def test_normalization():
    p = SamplingParams(stop="###", top_k=0, logit_bias={"15": 2.0, 7: -1})
    assert p.stop == ["###"] and p.top_k == -1 and p.logit_bias == {15: 2.0, 7: -1}
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_sequences_started_per_request():
    assert SamplingParams(n=3).num_sequences == 3
    assert SamplingParams(n=2, best_of=5).num_sequences == 5
    assert SamplingParams(use_beam_search=True, beam_width=4, n=2).num_sequences == 1


def test_clone_is_independent():
    p = SamplingParams(max_tokens=None, stop=["a"], logit_bias={1: 1.0})
    c = p.clone()
    c.max_tokens = 5
    c.stop.append("b")
    c.logit_bias[2] = 1.0
    assert p.max_tokens is None and p.stop == ["a"] and p.logit_bias == {1: 1.0}
