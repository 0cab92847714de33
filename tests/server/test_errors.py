"""Every bad request gets a 4xx in OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import threading

import httpx
import pytest

from peregrine.config import EngineConfig
from peregrine.engine.async_engine import AsyncLLMEngine
from peregrine.server.app import ServerArgs, build_app
from peregrine.server.metrics import ServerMetrics
from tests.server.conftest import serve

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 *words: str) -> dict:
    """The response is `status` with {"error": {message, type, param, code}}."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err
    return err


def test_malformed_json(http):
    r = http.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    err = assert_error(r, 400, None, "not valid JSON")
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"


def test_invalid_utf8_body(http):
    body = b'{"prompt": "caf\xe9", "max_tokens": 2}'
    assert_error(http.post(COMPLETIONS, content=body), 400, None, "UTF-8")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null", b""])
def test_body_must_be_a_json_object(http, body):
    assert_error(http.post(COMPLETIONS, content=body), 400)


def test_nan_is_not_json(http):
    body = b'{"prompt": "hi", "temperature": NaN}'
    assert_error(http.post(COMPLETIONS, content=body), 400, None, "NaN")


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("max_tokens", 1.5), ("n", "two"), ("stream", {"a": 1}),
    ("stop", 3), ("seed", "x"), ("logit_bias", [1]), ("messages", "hello"),
])
def test_wrong_types_name_the_field(http, field, value):
    body = {"messages": HELLO, "max_tokens": 2, field: value}
    assert_error(http.post(CHAT, json=body), 400, field, field)


def test_missing_required_field(http):
    assert_error(http.post(COMPLETIONS, json={"max_tokens": 2}), 400, "prompt", "prompt")
    assert_error(http.post(CHAT, json={"max_tokens": 2}), 400, "messages", "messages")


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("top_p", 1.5), ("top_p", 0), ("n", 0), ("max_tokens", 0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("top_k", -5), ("min_p", 1.5),
    ("repetition_penalty", 0), ("min_tokens", -1), ("logprobs", 50),
])
def test_out_of_range_sampling_values(http, field, value):
    body = {"prompt": "Hello", "max_tokens": 4, field: value}
    assert_error(http.post(COMPLETIONS, json=body), 400, field, field, str(value))


def test_logit_bias_out_of_range_and_bad_keys(http):
    base = {"prompt": "Hello", "max_tokens": 2}
    assert_error(http.post(COMPLETIONS, json={**base, "logit_bias": {"42": 500}}), 400,
                 "logit_bias", "logit_bias")
    assert_error(http.post(COMPLETIONS, json={**base, "logit_bias": {"hello": 1}}), 400,
                 "logit_bias", "token ids")


def test_top_logprobs_needs_logprobs(http):
    r = http.post(CHAT, json={"messages": HELLO, "top_logprobs": 2})
    assert_error(r, 400, "top_logprobs", "logprobs")
    r = http.post(CHAT, json={"messages": HELLO, "logprobs": True, "top_logprobs": 99})
    assert_error(r, 400, "top_logprobs", "20")


def test_unknown_model_is_404(http):
    err = assert_error(http.post(CHAT, json={"model": "gpt-5", "messages": HELLO}), 404,
                       "model", "gpt-5", "smollm2-135m")
    assert err["code"] == "model_not_found"
    assert_error(http.post("/tokenize", json={"model": "gpt-5", "prompt": "x"}), 404, "model")


def test_prompt_plus_max_tokens_longer_than_the_context(http, server):
    context = server.engine.engine.max_model_len
    r = http.post(COMPLETIONS, json={"prompt": "Hello there", "max_tokens": context + 100})
    assert_error(r, 400, "max_tokens", str(context + 100), str(context))
    r = http.post(CHAT, json={"messages": HELLO, "max_completion_tokens": context})
    assert_error(r, 400, None, str(context))


def test_chat_prompt_longer_than_the_context(http, server):
    limit = server.engine.engine.kv.num_blocks * server.engine.engine.kv.block_size
    long = "hello " * (limit + 10)
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": long}]})
    assert_error(r, 400, "messages", "tokens", str(min(limit, 8192)))


def test_empty_messages(http):
    assert_error(http.post(CHAT, json={"messages": []}), 400, "messages", "empty")


def test_empty_prompt(http):
    assert_error(http.post(COMPLETIONS, json={"prompt": []}), 400, "prompt")
    assert_error(http.post(COMPLETIONS, json={"prompt": ""}), 400, None, "empty")


def test_bad_roles_and_parts(http):
    r = http.post(CHAT, json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert_error(r, 400, "messages.0.role")
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert_error(http.post(CHAT, json={"messages": [image]}), 400, "messages.0.content",
                 "image_url")
    r = http.post(CHAT, json={"messages": [{"role": "user"}]})
    assert_error(r, 400, "messages.0.content")


def test_bad_structured_output_requests(http):
    r = http.post(CHAT, json={"messages": HELLO, "max_tokens": 2,
                              "response_format": {"type": "regex"}})
    assert_error(r, 400, "response_format", "json_schema")
    r = http.post(CHAT, json={"messages": HELLO, "max_tokens": 2, "regex": "a+",
                              "response_format": {"type": "json_object"}})
    assert_error(r, 400, "regex", "at most one")
    r = http.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 2, "choice": ["a"],
                                     "guided_regex": "b"})
    assert_error(r, 400, "guided_regex", "at most one")
    r = http.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 2, "choice": []})
    assert_error(r, 400, "choice", "non-empty")
    r = http.post(COMPLETIONS, json={"prompt": "a", "structured_outputs": {"pattern": "a"}})
    assert_error(r, 400, "structured_outputs", "pattern")
    r = http.post(CHAT, json={"messages": HELLO, "max_tokens": 2,
                              "response_format": {"type": "json_schema", "json_schema": {}}})
    assert_error(r, 400, "response_format", "json_schema.schema")
    r = http.post(CHAT, json={"messages": HELLO, "max_tokens": 2,
                              "response_format": {"type": "text"}})
    assert r.status_code == 200


def test_unsupported_options(http):
    assert_error(http.post(COMPLETIONS, json={"prompt": "a", "suffix": "b"}), 400, "suffix")
    r = http.post(COMPLETIONS, json={"prompt": "a", "n": 2, "best_of": 3, "stream": True})
    assert_error(r, 400, "stream", "best_of")
    r = http.post(CHAT, json={"messages": HELLO, "use_beam_search": True, "stream": True})
    assert_error(r, 400, "stream", "beam")
    assert_error(http.post(COMPLETIONS, json={"prompt": "a", "n": 3, "best_of": 2}), 400,
                 "best_of", "best_of")
    tools = [{"type": "function", "function": {"name": "f g"}}]  # not a function name
    assert_error(http.post(CHAT, json={"messages": HELLO, "tools": tools}), 400,
                 "tools.0.function.name")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(CHAT), 405)


def test_tokenize_and_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "Hello world"})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0
    back = http.post("/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": HELLO}).json()
    assert chat["count"] > body["count"]
    assert_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={}), 400, "prompt")


def test_the_server_still_serves_after_all_that(http, server):
    r = http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert server.wait_idle()["peregrine:kv_cache_usage"] == 0
    assert server.metrics()['peregrine:request_rejected_total{reason="invalid"}'] > 10


def test_health_is_503_while_loading_then_says_why_loading_failed():
    release = threading.Event()

    def slow_failing_load(config: EngineConfig):
        release.wait(30)
        raise RuntimeError("weights are corrupt")

    metrics = ServerMetrics("m", lambda: None)
    engine = AsyncLLMEngine(EngineConfig(), observer=metrics, engine_factory=slow_failing_load)
    app = build_app(ServerArgs(), engine, metrics, ["m"])
    with serve(ServerArgs(), app=app, wait_loaded=False) as s, \
            httpx.Client(base_url=s.url, timeout=30) as client:
        assert_error(client.get("/health"), 503, None, "loading")
        r = client.post(CHAT, json={"messages": HELLO})
        assert_error(r, 503, None, "loading")
        assert r.headers["retry-after"]
        release.set()
        engine.loaded.wait(10)
        assert_error(client.get("/health"), 503, None, "weights are corrupt")
        assert_error(client.post(CHAT, json={"messages": HELLO}), 503, None, "failed to load")
