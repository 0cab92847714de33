"""Strict at the door: no coercion, OpenAI's ranges, invalid Unicode, deep JSON, and every
size limit (body, sequences, stop strings, messages, prompt tokens, default max_tokens)
refused with a 4xx in OpenAI's shape, after which the server still serves and holds no KV
block."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from peregrine.config import EngineConfig
from peregrine.server.app import ServerArgs
from tests.server.conftest import SMALL_KV, RunningServer, serve
from tests.server.test_errors import CHAT, COMPLETIONS, HELLO, assert_error

LIMITS = ServerArgs(max_request_bytes=20_000, max_json_depth=16, max_n=3,
                    max_stop_sequences=2, max_messages=4, max_prompt_tokens=64,
                    max_tokens_default=3, max_queue_len=8)


@pytest.fixture(scope="module")
def limited() -> Iterator[RunningServer]:
    """A server with small limits, so each can be reached cheaply."""
    with serve(LIMITS, EngineConfig(**SMALL_KV)) as s:
        yield s


@pytest.fixture
def lhttp(limited: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, timeout=60) as client:
        yield client


# --- types are strict, as OpenAI's ----------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("max_tokens", "10"), ("max_tokens", True), ("stream", "yes"), ("echo", "yes"),
    ("n", 1.0), ("temperature", "0.5"), ("logprobs", False), ("seed", "7"),
    ("stop", ["a", 1]), ("prompt", [1, True]),
])
def test_no_type_coercion_in_completions(http, field, value):
    body = {"prompt": "Hello", "max_tokens": 2, field: value}
    assert_error(http.post(COMPLETIONS, json=body), 400, field, field)


@pytest.mark.parametrize("field,value", [
    ("max_completion_tokens", "5"), ("logprobs", "true"), ("stream", 1),
    ("add_generation_prompt", "no"), ("top_logprobs", 2.0),
])
def test_no_type_coercion_in_chat(http, field, value):
    body = {"messages": HELLO, "max_tokens": 2, field: value}
    assert_error(http.post(CHAT, json=body), 400, field, field)


def test_message_fields_are_strict_too(http):
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": 5}], "max_tokens": 2})
    assert_error(r, 400, "messages.0.content")
    parts = [{"type": "text", "text": 5}]
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": parts}]})
    assert_error(r, 400, "messages.0.content")


# --- OpenAI's ranges ------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", 1e308), ("temperature", 2.01), ("top_p", 1.5), ("presence_penalty", -2.5),
    ("frequency_penalty", 7), ("top_k", 2**40), ("seed", 2**70), ("priority", -(2**64)),
    ("min_p", -0.1), ("repetition_penalty", 1e9), ("stop_token_ids", [10**9]),
])
def test_values_outside_their_range(http, field, value):
    body = {"prompt": "Hello", "max_tokens": 2, field: value}
    assert_error(http.post(COMPLETIONS, json=body), 400, field, field)


def test_top_logprobs_and_logit_bias_bounds(http):
    r = http.post(CHAT, json={"messages": HELLO, "logprobs": True, "top_logprobs": 21})
    assert_error(r, 400, "top_logprobs", "20")
    bias = {str(i): 1.0 for i in range(301)}
    r = http.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 1, "logit_bias": bias})
    assert_error(r, 400, "logit_bias", "300")
    ok = {str(i): 1.0 for i in range(300)}
    r = http.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 1, "logit_bias": ok})
    assert r.status_code == 200, r.text


# --- Unicode and JSON shape -----------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ('{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ('{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt.1"),
    ('{"prompt": "a", "stop": ["\\ud83d"], "max_tokens": 1}', "stop.0"),
    ('{"prompt": "a", "logit_bias": {"\\ud800": 1}, "max_tokens": 1}', "logit_bias"),
])
def test_lone_surrogates_are_400_naming_where(http, body, param):
    err = assert_error(http.post(COMPLETIONS, content=body.encode()), 400, param, "Unicode")
    assert err["code"] == "invalid_encoding"


def test_lone_surrogate_in_a_chat_message(http):
    body = '{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 1}'
    assert_error(http.post(CHAT, content=body.encode()), 400, "messages.0.content", "Unicode")


def test_a_valid_surrogate_pair_is_fine(http):
    body = '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    assert http.post(COMPLETIONS, content=body.encode()).status_code == 200


def deep(depth: int) -> bytes:
    return ('{"prompt": "a", "max_tokens": 1, "x": ' + "[" * depth + "]" * depth + "}").encode()


def test_deep_json_is_400(lhttp, http):
    err = assert_error(lhttp.post(COMPLETIONS, content=deep(17)), 400, None, "deeper than 16")
    assert err["code"] == "invalid_json"
    # deeper than Python's own parser can go (the default limit is 64)
    assert_error(http.post(COMPLETIONS, content=deep(100_000)), 400, None, "deeper than 64")


def test_json_within_the_depth_limit_is_fine(lhttp):
    assert lhttp.post(COMPLETIONS, content=deep(10)).status_code == 200


# --- sizes ----------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_from_content_length(lhttp):
    body = json.dumps({"prompt": "a" * 30_000, "max_tokens": 1}).encode()
    err = assert_error(lhttp.post(COMPLETIONS, content=body), 413, None, "20000")
    assert err["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(lhttp):
    """No Content-Length: the body is counted as it streams in."""
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(1000):
            yield b"a" * 1000
        yield b'"}'

    err = assert_error(lhttp.post(COMPLETIONS, content=chunks()), 413, None, "more than 20000")
    assert err["code"] == "request_too_large"


def test_default_body_limit_is_a_few_megabytes(http):
    body = b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}'
    assert_error(http.post(COMPLETIONS, content=body), 413)


@pytest.mark.parametrize("field,value", [("n", 100_000), ("best_of", 100_000), ("n", 17)])
def test_sequences_per_prompt_are_capped(http, field, value):
    body = {"prompt": "a", "max_tokens": 1, field: value}
    assert_error(http.post(COMPLETIONS, json=body), 400, field, "max-n")


def test_sequences_capped_by_max_n_and_the_engine(lhttp, strict_server):
    assert_error(lhttp.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 1, "n": 4}), 400, "n")
    r = lhttp.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 1, "n": 3})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    beams = {"prompt": "a", "max_tokens": 1, "use_beam_search": True, "beam_width": 4}
    assert_error(lhttp.post(COMPLETIONS, json=beams), 400, "beam_width")
    # this engine runs one sequence at a time: two of one prompt could never run together
    with httpx.Client(base_url=strict_server.url, timeout=60,
                      headers={"Authorization": "Bearer sk-test-key"}) as c:
        r = c.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 1, "n": 2})
        assert_error(r, 400, "n", "max-num-seqs")


def test_stop_strings_are_capped(lhttp, http):
    body = {"prompt": "a", "max_tokens": 1, "stop": ["x", "y", "z"]}
    assert_error(lhttp.post(COMPLETIONS, json=body), 400, "stop", "2")
    body["stop"] = ["1", "2", "3", "4", "5"]
    assert_error(http.post(COMPLETIONS, json=body), 400, "stop", "4")
    body["stop"] = ["1", "2", "3", "4"]
    assert http.post(COMPLETIONS, json=body).status_code == 200


def test_messages_are_capped(lhttp):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}] * 3
    assert_error(lhttp.post(CHAT, json={"messages": msgs}), 400, "messages", "max-messages")


def test_prompt_tokens_are_capped(lhttp):
    long = "word " * 200
    assert_error(lhttp.post(COMPLETIONS, json={"prompt": long, "max_tokens": 1}), 400,
                 "prompt", "64")
    assert_error(lhttp.post(COMPLETIONS, json={"prompt": ["hi", long], "max_tokens": 1}), 400,
                 "prompt")
    ids = list(range(100, 200))
    assert_error(lhttp.post(COMPLETIONS, json={"prompt": ids, "max_tokens": 1}), 400, "prompt")
    r = lhttp.post(CHAT, json={"messages": [{"role": "user", "content": long}]})
    assert_error(r, 400, "messages", "max-prompt-tokens")
    # a count is not a generation: /tokenize still counts it
    assert lhttp.post("/tokenize", json={"prompt": long}).json()["count"] > 64


def test_huge_text_is_refused_before_it_is_tokenized(http, server):
    """3 MB of text against an 8k context: refused after counting about 8k tokens."""
    text = "The quick brown fox jumps over the lazy dog. " * 70_000
    start = time.monotonic()
    r = http.post(COMPLETIONS, json={"prompt": text, "max_tokens": 1})
    err = assert_error(r, 400, "prompt", "at least")
    assert str(server.engine.context_limit) in err["message"]
    print(f"refused in {time.monotonic() - start:.2f}s")


def test_too_many_prompts_in_one_request(lhttp):
    body = {"prompt": ["a"] * 9, "max_tokens": 1}
    assert_error(lhttp.post(COMPLETIONS, json=body), 400, "prompt", "max-queue-len")


def test_template_arguments_the_server_sets_cannot_be_overridden(http):
    body = {"messages": HELLO, "max_tokens": 1, "chat_template_kwargs": {"messages": []}}
    assert_error(http.post(CHAT, json=body), 400, "chat_template_kwargs", "messages")


def test_chat_without_max_tokens_gets_the_default(lhttp, limited):
    r = lhttp.post(CHAT, json={"messages": HELLO, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["finish_reason"] == "length"
    # asking for more is allowed: the default only fills in a missing value
    r = lhttp.post(CHAT, json={"messages": HELLO, "max_tokens": 5, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 5


def test_default_max_tokens_zero_fills_the_context():
    args = ServerArgs(max_tokens_default=0)
    with serve(args, EngineConfig(**SMALL_KV, max_model_len=48)) as s:
        r = httpx.post(s.api + "/chat/completions", timeout=120,
                       json={"messages": HELLO, "ignore_eos": True, "temperature": 0})
        body = r.json()
        assert body["usage"]["total_tokens"] == 48


def test_still_serving_and_no_block_held_after_the_limits(lhttp, limited):
    r = lhttp.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200
    m = limited.wait_idle()
    assert m["peregrine:kv_cache_usage"] == 0
