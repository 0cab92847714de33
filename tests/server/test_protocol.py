"""The wire format without a server: request fields -> SamplingParams, engine logprobs ->
OpenAI's two logprobs shapes, chat messages -> template input."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from peregrine.outputs import Logprob
from peregrine.server.metrics import length_buckets
from peregrine.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from peregrine.server.serving import chat_logprobs, chat_messages, completion_logprobs


class FakeTokenizer:
    """Token id i decodes to the letter chr(ord('a') + i)."""

    def token_text(self, token_id: int) -> str:
        return chr(ord("a") + token_id)


def test_every_field_maps_onto_sampling_params():
    req = CompletionRequest.model_validate({
        "prompt": "x", "n": 2, "temperature": 0.7, "top_p": 0.9, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "logit_bias": {"42": -100, "7": 3.5}, "seed": 11,
        "stop": "END", "top_k": 40, "min_p": 0.1, "repetition_penalty": 1.3, "min_tokens": 2,
        "ignore_eos": True, "stop_token_ids": [5], "skip_special_tokens": False,
        "include_stop_str_in_output": True, "user": "someone", "unknown_field": 1})
    p = req.sampling_params(max_tokens=20, logprobs=3)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (2, 0.7, 0.9, 40, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.3)
    assert p.logit_bias == {42: -100, 7: 3.5} and p.seed == 11
    assert p.stop == ["END"] and p.stop_token_ids == [5]
    assert (p.max_tokens, p.min_tokens, p.ignore_eos, p.logprobs) == (20, 2, True, 3)
    assert not p.skip_special_tokens and p.include_stop_str_in_output


def test_beam_search_extras():
    req = CompletionRequest.model_validate({"prompt": "x", "n": 2, "use_beam_search": True,
                                            "length_penalty": 0.5})
    p = req.sampling_params(max_tokens=8, logprobs=None)
    assert p.use_beam_search and p.beam_width == 4 and p.length_penalty == 0.5 and p.n == 2


def test_openai_defaults():
    p = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}]}).sampling_params(10, None)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == \
        (1, 1.0, 1.0, -1, 0.0, 1.0)
    assert p.stop == [] and p.logit_bias is None and p.seed is None and p.logprobs is None


def test_out_of_range_values_raise_naming_the_field():
    with pytest.raises(ValidationError, match="temperature"):
        CompletionRequest.model_validate({"prompt": "x", "temperature": -1})
    # OpenAI's range lets top_p be 0; the engine's domain does not
    req = CompletionRequest.model_validate({"prompt": "x", "top_p": 0})
    with pytest.raises(ValueError, match="^top_p"):
        req.sampling_params(5, None)


def test_types_are_not_coerced():
    for field, value in [("max_tokens", "10"), ("max_tokens", True), ("stream", "yes"),
                         ("echo", 1), ("n", 2.0)]:
        with pytest.raises(ValidationError, match=field):
            CompletionRequest.model_validate({"prompt": "x", field: value})


def _lp(*pairs: tuple[int, float]) -> dict[int, Logprob]:
    ranked = sorted(pairs, key=lambda p: -p[1])
    return {t: Logprob(v, rank=ranked.index((t, v)) + 1) for t, v in pairs}


ENGINE_LOGPROBS = [_lp((0, -0.1), (1, -2.5), (2, -3.0)),  # chose "a", the most likely
                   _lp((3, -1.5), (1, -0.4), (2, -2.0))]  # chose "d", rank 3 of 3


def test_completion_logprobs_shape():
    lp = completion_logprobs(FakeTokenizer(), [0, 3], ENGINE_LOGPROBS, num_top=1,
                             text_offset=10)
    assert lp.tokens == ["a", "d"]
    assert lp.token_logprobs == [-0.1, -1.5]
    assert lp.text_offset == [10, 11]
    # The top-1 alternative, plus the chosen token when it is not among them.
    assert lp.top_logprobs == [{"a": -0.1}, {"b": -0.4, "d": -1.5}]


def test_chat_logprobs_shape():
    lp = chat_logprobs(FakeTokenizer(), [0, 3], ENGINE_LOGPROBS, num_top=2)
    first, second = lp.content
    assert (first.token, first.logprob, first.bytes) == ("a", -0.1, [97])
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("a", -0.1), ("b", -2.5)]
    assert [(t.token, t.logprob) for t in second.top_logprobs] == [("b", -0.4), ("d", -1.5)]


def test_minus_infinity_becomes_a_json_safe_number():
    lp = completion_logprobs(FakeTokenizer(), [0], [{0: Logprob(-math.inf, 1)}], 0, 0)
    assert lp.token_logprobs == [-9999.0]


def test_chat_messages_join_text_parts_and_map_developer_to_system():
    msgs = [ChatMessage.model_validate(m) for m in [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                     "text": "b"}]},
        {"role": "assistant", "content": None}]]
    assert chat_messages(msgs) == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "a\nb"},
                                   {"role": "assistant", "content": ""}]


def test_length_buckets():
    assert length_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert length_buckets(8192)[-1] == 5000
