"""Anthropic's Messages API through the anthropic client against a running server: text,
system prompts, streaming events, tool use (any / a named tool, streamed input JSON), a
history with tool_use and tool_result blocks, count_tokens, x-api-key auth, and errors in
Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused")


def test_a_text_answer(client):
    r = client.messages.create(model=MODEL, max_tokens=8, system="Be brief.",
                               messages=[{"role": "user", "content": "Name a fruit."}],
                               stop_sequences=["\n\n\n"])
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens", "stop_sequence")
    assert r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 8


def test_max_tokens_is_the_stop_reason_when_it_is_reached(client, http):
    r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 3, "messages": ASK,
                                        "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 3


def test_streamed_text_equals_the_final_message(client):
    with client.messages.stream(model=MODEL, max_tokens=12, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens <= 12


def test_tool_use_any_and_named(client):
    r = client.messages.create(model=MODEL, max_tokens=64, messages=ASK, tools=[WEATHER],
                               tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert r.stop_reason == "tool_use"
    (use,) = r.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(model=MODEL, max_tokens=64, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"
    jsonschema.validate(final.content[-1].input, WEATHER["input_schema"])


def test_a_history_with_tool_use_and_tool_result(client):
    history = ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "18 C and sunny"}]}]
    r = client.messages.create(model=MODEL, max_tokens=8, messages=history, tools=[WEATHER])
    assert r.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_count_tokens_matches_the_prompt_a_request_uses(client, http):
    counted = client.messages.count_tokens(model=MODEL, messages=ASK).input_tokens
    r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 1, "messages": ASK})
    assert counted == r.json()["usage"]["input_tokens"] > 0


@pytest.mark.parametrize("body,words", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"temperature": 1.5}, "temperature"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "content"),
    ({"tool_choice": {"type": "tool"}, "tools": [WEATHER]}, "tool_choice"),
    ({"model": "claude-9"}, "claude-9"),
])
def test_errors_come_in_anthropics_shape(http, body, words):
    r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": ASK,
                                        **body})
    assert r.status_code in (400, 404), r.text
    err = r.json()
    assert err["type"] == "error" and set(err["error"]) == {"type", "message"}
    assert err["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert words in err["error"]["message"]


def test_x_api_key_is_accepted_as_the_key(strict_server):
    url = strict_server.url + "/v1/messages/count_tokens"
    body = {"model": "smol", "messages": ASK}
    assert httpx.post(url, json=body, headers={"x-api-key": "sk-test-key"}).status_code == 200
    r = httpx.post(url, json=body, headers={"x-api-key": "wrong"})
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {
        "type": "authentication_error", "message": r.json()["error"]["message"]}}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=strict_server.url, api_key="wrong").messages.create(
            model="smol", max_tokens=2, messages=ASK)
