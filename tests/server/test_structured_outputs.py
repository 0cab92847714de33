"""Structured outputs through the OpenAI API: response_format json_object / json_schema and
the regex / choice / grammar fields (plus vLLM's names), streamed or not, n > 1; a bad
constraint is a 400 naming its field and the server keeps serving."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
SCHEMA_FORMAT = {"type": "json_schema",
                 "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)


def test_chat_json_schema_with_n(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=64,
                                       n=3, temperature=0.7, seed=3,
                                       response_format=SCHEMA_FORMAT)
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_streamed_chat_json_object(client):
    stream = client.chat.completions.create(
        model="smollm2-135m", max_tokens=64, temperature=0, stream=True,
        messages=[{"role": "user",
                   "content": "Give a JSON object with one short key and value."}],
        response_format={"type": "json_object"})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("field,value,check", [
    ("regex", r"\d{3}-\d{4}", lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
    ("guided_regex", r"[A-Z]{2}\d", lambda t: re.fullmatch(r"[A-Z]{2}\d", t)),
    ("choice", ["cat", "dog"], lambda t: t in ("cat", "dog")),
    ("guided_choice", ["up", "down"], lambda t: t in ("up", "down")),
    ("grammar", 'root ::= "<" [a-z]+ ">"', lambda t: re.fullmatch(r"<[a-z]+>", t)),
    ("guided_json", PERSON, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ("structured_outputs", {"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
])
def test_completion_constraint_fields(client, field, value, check):
    r = client.completions.create(model="smollm2-135m", prompt="Answer: ", max_tokens=48,
                                  temperature=0, extra_body={field: value})
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "stop" and check(text), text


def test_streamed_completion_with_n(client):
    stream = client.completions.create(model="smollm2-135m", prompt="Code: ", max_tokens=12,
                                       n=2, temperature=0.8, seed=1, stream=True,
                                       extra_body={"regex": r"[a-z]{2}-\d{2}"})
    texts = ["", ""]
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.text
    assert all(re.fullmatch(r"[a-z]{2}-\d{2}", t) for t in texts), texts


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "response_format"),
    ({"regex": "(unclosed"}, "regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
])
def test_invalid_constraint_is_a_400_and_the_server_goes_on(server, body, param):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "invalid" in err["message"]
        ok = http.post("/v1/chat/completions", json={
            "messages": ASK, "max_tokens": 8, "temperature": 0, "regex": "[ab]{3}"})
        assert ok.status_code == 200
        assert re.fullmatch("[ab]{3}", ok.json()["choices"][0]["message"]["content"])
    server.wait_idle()
    assert server.metrics()["peregrine:kv_cache_usage"] == 0
