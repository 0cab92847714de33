"""Reading tool calls out of model text (peregrine/server/tools.py): each syntax parsed
whole, the same calls found when the text arrives in pieces of any size, text that only
looks like a call left as text, and the prompt a template without tools is given."""

from __future__ import annotations

import json

import pytest

from peregrine.server.protocol import ChatTool, NamedToolChoice
from peregrine.server.tools import (StreamParser, choose_parser, forced_calls, forced_schema,
                                    parse_calls, prepare_messages, template_knows_tools)

NAMES = {"get_weather", "add"}
HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
          '"units": {"t": "c"}}}\n</tool_call>\n<tool_call>{"arguments": {"a": 1, "b": [2, 3]}'
          ', "name": "add"}</tool_call> Done.')
CASES = {
    "hermes": HERMES,
    "mistral": '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, '
               '{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    "llama3_json": '<|python_tag|>{"name": "add", "parameters": {"a": 2}}; '
                   '{"name": "get_weather", "parameters": {"city": "Rome"}}',
    "json": '```json\n[{"name": "add", "arguments": {"a": 3}}]\n```',
}


def as_pairs(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def streamed(parser: str, text: str, step: int, forced=None) -> tuple[str, list]:
    """Feed `text` `step` characters at a time; assemble content and calls as a client."""
    p = StreamParser(parser, NAMES, forced)
    content, calls = "", {}
    for i in range(0, len(text), step):
        d = p.feed(text[i:i + step], i + step >= len(text))
        content += d.content
        for piece in d.tool_calls:
            call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
            if "id" in piece:
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                call["name"] = piece["function"]["name"]
            call["arguments"] += piece["function"]["arguments"]
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_hermes_calls_and_the_text_around_them():
    content, calls = parse_calls(HERMES, "hermes", NAMES)
    assert content == "Let me check. \n Done."
    assert as_pairs(calls) == [("get_weather", {"city": "Paris", "units": {"t": "c"}}),
                               ("add", {"a": 1, "b": [2, 3]})]


@pytest.mark.parametrize("parser", list(CASES))
def test_each_syntax_parses_whole(parser):
    content, calls = parse_calls(CASES[parser], parser, NAMES)
    assert calls and all(name in NAMES for name, _ in as_pairs(calls))
    if parser != "hermes":
        assert content is None


@pytest.mark.parametrize("parser", list(CASES))
@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 13, 1000])
def test_streamed_in_any_pieces_equals_whole(parser, step):
    text = CASES[parser]
    whole_content, whole_calls = parse_calls(text, parser, NAMES)
    content, calls = streamed(parser, text, step)
    assert calls == as_pairs(whole_calls)
    assert content.strip() == (whole_content or "").strip() or parser == "hermes"
    if parser == "hermes":  # the markup never reaches the client as text
        assert "<tool_call>" not in content and "tool_call" not in content
        assert content.replace(" ", "").replace("\n", "") == "Letmecheck.Done."


def test_hermes_arguments_stream_before_the_call_ends():
    p = StreamParser("hermes", NAMES)
    d = p.feed('<tool_call>{"name": "add", "arguments": {"a": 1, "b"', False)
    assert d.tool_calls[0]["function"]["name"] == "add"
    assert "".join(t["function"]["arguments"] for t in d.tool_calls) == '{"a": 1, "b"'


@pytest.mark.parametrize("text", [
    "Plain answer, no calls.",
    "I would write <tool_call>{not json}</tool_call> here.",
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not a given tool
    "x < y and <tool but not a call",
])
def test_what_only_looks_like_a_call_stays_text(text):
    content, calls = parse_calls(text, "hermes", NAMES)
    assert calls == [] and content == text
    got, calls = streamed("hermes", text, 1)
    assert calls == [] and got == text


def test_parser_is_read_off_the_template():
    assert choose_parser("... [TOOL_CALLS] ...") == "mistral"
    assert choose_parser("... <|python_tag|> ...") == "llama3_json"
    assert choose_parser("{% for m in messages %}...") == "hermes"
    assert choose_parser("[TOOL_CALLS]", "json") == "json"
    with pytest.raises(ValueError, match="tool_call_parser"):
        choose_parser(None, "xml")
    assert template_knows_tools("{% if tools %}...{% endif %}")
    assert not template_knows_tools("{% for message in messages %}")


TOOLS = [ChatTool.model_validate({"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                                  "required": ["a"]}}}),
         ChatTool.model_validate({"type": "function", "function": {"name": "get_weather"}})]


def test_forced_schemas_and_their_outputs():
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "add"}})
    assert forced_schema(TOOLS, named, True) == TOOLS[0].function.parameters
    required = forced_schema(TOOLS, "required", parallel=False)
    assert required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
    assert "maxItems" not in forced_schema(TOOLS, "required", parallel=True)
    assert as_pairs(forced_calls('{"a": 4}', named)) == [("add", {"a": 4})]
    text = '[{"name": "get_weather", "arguments": {}}, {"name": "add", "arguments": {"a": 1}}]'
    assert as_pairs(forced_calls(text, "required")) == [("get_weather", {}), ("add", {"a": 1})]
    content, calls = streamed("hermes", '{"a": 7}', 2, forced=named)
    assert content == "" and calls == [("add", {"a": 7})]


def test_a_forced_array_cut_short_keeps_its_completed_calls():
    cut = '[{"name":"add","arguments":{"a":1}},{"name":"add","arguments":{"a":2}},{"name":"ad'
    assert as_pairs(forced_calls(cut, "required")) == [("add", {"a": 1}), ("add", {"a": 2})]
    content, calls = streamed("hermes", cut, 3, forced="required")
    assert content == "" and calls == [("add", {"a": 1}), ("add", {"a": 2})]
    with pytest.raises(ValueError):
        forced_calls('[{"name":"add","argu', "required")


def test_a_template_without_tools_is_taught_them_and_sees_the_history():
    history = [{"role": "user", "content": "Add 1"},
               {"role": "assistant", "content": "", "tool_calls": [{
                   "id": "call_1", "type": "function",
                   "function": {"name": "add", "arguments": '{"a": 1}'}}]},
               {"role": "tool", "content": "1", "tool_call_id": "call_1"}]
    msgs = prepare_messages(history, TOOLS, knows_tools=False)
    assert msgs[0]["role"] == "system" and '"name": "add"' in msgs[0]["content"]
    assert msgs[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert msgs[3] == {"role": "tool", "content": "<tool_response>\n1\n</tool_response>"}
    native = prepare_messages(history, TOOLS, knows_tools=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert native[2]["tool_call_id"] == "call_1" and native[0] == history[0]
