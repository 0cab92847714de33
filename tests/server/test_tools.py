"""Tool calling through the openai client against a running server: required, named and
none enforced (the arguments always validate against the function's schema), parallel
calls, streamed tool-call deltas that assemble into the non-streamed calls, a history with
calls and tool answers, and malformed tools refused naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.test_errors import CHAT, assert_error

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "timezone": {"type": "string"}}, "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused")


def ask(client, **kw):
    kw = {"max_tokens": 160, **kw}
    return client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS,
                                          temperature=0, **kw)


def assemble(chunks) -> tuple[str, list[tuple[str, dict]], str | None]:
    """What a client builds from streamed deltas: content, calls, finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.id:
                call["id"] = tc.id
            if tc.function.name:
                call["name"] = tc.function.name
            call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], \
        finish


def pairs(message) -> list[tuple[str, dict]]:
    return [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []]


def test_required_calls_validate_and_may_be_parallel(client):
    r = ask(client, tool_choice="required")
    choice = r.choices[0]
    # a small model may keep adding calls until max_tokens: the completed ones still count
    assert choice.finish_reason in ("tool_calls", "length")
    assert choice.message.content is None
    calls = pairs(choice.message)
    assert len(calls) >= 2
    for name, args in calls:
        jsonschema.validate(args, SCHEMAS[name])
    assert all(t.id.startswith("call_") and t.type == "function"
               for t in choice.message.tool_calls)
    single = ask(client, tool_choice="required", parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1
    assert single.choices[0].finish_reason == "tool_calls"


def test_a_named_function_is_called(client):
    r = ask(client, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (name, args), = pairs(r.choices[0].message)
    assert name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(args, SCHEMAS["get_time"])


def test_none_means_an_answer_in_text(client):
    r = ask(client, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("choice", ["required",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_calls_assemble_into_the_same_calls(client, choice):
    whole = ask(client, tool_choice=choice)
    content, calls, finish = assemble(ask(client, tool_choice=choice, stream=True))
    assert content == "" and finish == whole.choices[0].finish_reason
    assert calls == pairs(whole.choices[0].message) and calls


def test_a_named_call_cut_by_max_tokens_is_a_cut_call_streamed_or_not(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = ask(client, tool_choice=named, max_tokens=4)
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "length" and call.function.name == "get_weather"
    assert call.function.arguments.startswith("{") and whole.choices[0].message.content is None
    chunks = list(ask(client, tool_choice=named, max_tokens=4, stream=True))
    streamed = "".join(tc.function.arguments or "" for c in chunks if c.choices
                       for tc in c.choices[0].delta.tool_calls or [])
    assert streamed == call.function.arguments


def test_auto_answers_or_calls_but_never_leaks_markup(client):
    for stream in (False, True):
        if stream:
            content, calls, _ = assemble(ask(client, tool_choice="auto", stream=True))
        else:
            message = ask(client, tool_choice="auto").choices[0].message
            content, calls = message.content or "", pairs(message)
        assert "<tool_call>" not in content
        for name, args in calls:
            assert name in SCHEMAS


def test_a_history_with_calls_and_answers_is_accepted(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = client.chat.completions.create(model="smollm2-135m", messages=history, tools=TOOLS,
                                       max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
])
def test_malformed_tools_are_400_naming_the_field(http, body, param):
    r = http.post(CHAT, json={"messages": ASK, "max_tokens": 4, **body})
    assert_error(r, 400, param)
