"""OpenAI's Responses API through the openai client against a running server: text and
instructions, streaming events (their order, and that they assemble into the same
response), function calls (required, named) and their outputs sent back, conversations
continued with previous_response_id, stored responses (GET, DELETE, input items,
store: false), incomplete responses, text.format, and 400s naming the field."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from peregrine.server.responses import ResponseStore, StoredResponse

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
ASK = "What is the weather in Paris?"
ABORTED = 'peregrine:request_success_total{finished_reason="abort"}'


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused")


def create(client, **kw):
    return client.responses.create(**{"model": MODEL, "temperature": 0,
                                      "max_output_tokens": 8, **kw})


def shape(output: list) -> list[dict]:
    """Output items without their generated ids (which differ between two requests)."""
    return [{k: v for k, v in item.model_dump(exclude_none=True).items() if k != "id"}
            for item in output]


def test_a_text_answer(client):
    r = create(client, input="Name a fruit.")
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.error is None
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status in ("completed", "incomplete")
    (part,) = message.content
    assert part.type == "output_text" and part.annotations == [] and part.text
    assert r.output_text == part.text
    u = r.usage
    assert 0 < u.output_tokens <= 8 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0
    assert u.output_tokens_details.reasoning_tokens == 0
    assert r.store is True and r.tools == [] and r.tool_choice == "auto"
    assert r.text.format.type == "text" and r.max_output_tokens == 8


def test_instructions_are_a_system_prompt(client, http):
    told = create(client, input="Name a fruit.", max_output_tokens=1,
                  instructions="Answer in French, in one word.")
    assert told.instructions == "Answer in French, in one word."
    chat = http.post("/tokenize", json={"messages": [
        {"role": "system", "content": "Answer in French, in one word."},
        {"role": "user", "content": "Name a fruit."}]}).json()
    assert told.usage.input_tokens == chat["count"]


def test_max_output_tokens_makes_the_response_incomplete(client):
    r = create(client, input="Tell me a long story about a dragon.", max_output_tokens=4)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 4 and r.output[0].status == "incomplete"


TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta",
               "response.output_text.done", "response.content_part.done",
               "response.output_item.done"]


def squeeze(types: list[str]) -> list[str]:
    """The event types with runs of the same type made one."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def test_streamed_events_come_in_order_and_assemble_into_the_response(client):
    whole = create(client, input="Tell me a long story about a dragon.", max_output_tokens=12)
    events = list(create(client, input="Tell me a long story about a dragon.",
                         max_output_tokens=12, stream=True))
    assert squeeze([e.type for e in events]) == TEXT_EVENTS + ["response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.id == final.id
    assert created.created_at == final.created_at
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text == final.output_text == whole.output_text
    assert final.status == whole.status == "incomplete"
    assert shape(final.output) == shape(whole.output)
    assert final.usage.output_tokens == whole.usage.output_tokens == 12
    item = next(e for e in events if e.type == "response.output_item.done").item
    assert item.id == final.output[0].id and item.status == "incomplete"


def test_a_required_call_validates_against_the_schema(client):
    r = create(client, input=ASK, tools=[WEATHER], tool_choice="required",
               parallel_tool_calls=False, max_output_tokens=32)
    assert r.status == "completed"
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required"


def test_a_named_call_streams_its_arguments(client):
    with client.responses.stream(model=MODEL, input=ASK, tools=[WEATHER], temperature=0,
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 max_output_tokens=32) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert squeeze([e.type for e in events]) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    (call,) = final.output
    deltas = "".join(e.delta for e in events
                     if e.type == "response.function_call_arguments.delta")
    assert call.type == "function_call" and call.arguments == deltas
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    whole = create(client, input=ASK, tools=[WEATHER], max_output_tokens=32,
                   tool_choice={"type": "function", "name": "get_weather"})
    (same,) = whole.output
    assert (same.name, json.loads(same.arguments)) == (call.name, json.loads(call.arguments))


def test_a_function_call_output_continues_the_conversation(client):
    asked = create(client, input=ASK, tools=[WEATHER], tool_choice="required",
                   parallel_tool_calls=False, max_output_tokens=32)
    (call,) = asked.output
    answer = [{"type": "function_call_output", "call_id": call.call_id,
               "output": "18 C and sunny"}]
    followed = create(client, previous_response_id=asked.id, input=answer, tools=[WEATHER],
                      max_output_tokens=16)
    assert followed.previous_response_id == asked.id
    assert followed.output and followed.status in ("completed", "incomplete")
    # The same conversation sent whole, without the store, is the same prompt.
    whole = create(client, input=[{"role": "user", "content": ASK},
                                  *[i.model_dump(exclude_none=True) for i in asked.output],
                                  *answer],
                   tools=[WEATHER], max_output_tokens=16, store=False)
    assert whole.usage.input_tokens == followed.usage.input_tokens
    assert shape(whole.output) == shape(followed.output)


def test_previous_response_id_continues_without_the_instructions(client):
    first = create(client, input="My name is Ada.", instructions="Be brief.")
    second = create(client, input="What is my name?", previous_response_id=first.id)
    whole = create(client, store=False, input=[
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens == whole.usage.input_tokens  # instructions not carried
    assert second.instructions is None


def test_stored_responses_can_be_read_listed_and_deleted(client):
    r = create(client, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Name a fruit."}]}], metadata={"run": "7"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"run": "7"}
    (item,) = client.responses.input_items.list(r.id).data
    assert item.type == "message" and item.content[0].text == "Name a fruit."
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_store_false_keeps_nothing(client, http):
    r = create(client, input="Name a fruit.", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    answer = http.post("/v1/responses", json={"model": MODEL, "input": "And another?",
                                              "previous_response_id": r.id})
    assert answer.status_code == 404
    assert answer.json()["error"]["param"] == "previous_response_id"
    assert answer.json()["error"]["type"] == "not_found_error"


def test_text_format_json_schema_gives_json_that_follows_it(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string",
                                                          "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    r = create(client, input="Is Paris in France?", max_output_tokens=32,
               text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"
    r = create(client, input="Describe Paris as JSON.", max_output_tokens=16,
               text={"format": {"type": "json_object"}})
    assert r.output_text.lstrip().startswith("{")


def test_a_dropped_stream_aborts_its_request(server):
    before = server.metrics().get(ABORTED, 0)
    body = {"model": MODEL, "input": "Tell me a long story about a dragon.", "stream": True,
            "max_output_tokens": 256, "temperature": 0}

    async def drop() -> int:
        deltas = 0
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async with c.stream("POST", "/v1/responses", json=body) as r:
                async for line in r.aiter_lines():
                    deltas += line == "event: response.output_text.delta"
                    if deltas >= 2:
                        break
        return deltas

    assert asyncio.run(drop()) == 2
    m = server.wait_idle()
    assert m["peregrine:kv_cache_usage"] == 0 and m.get(ABORTED, 0) == before + 1


@pytest.mark.parametrize("body,param", [
    ({"input": None}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": "8"}, "max_output_tokens"),
    ({"max_output_tokens": 10**6}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"background": True}, "background"),
    ({"truncation": "sometimes"}, "truncation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"previous_response_id": "resp_unknown"}, "previous_response_id"),
    ({"model": "gpt-9"}, "model"),
])
def test_malformed_requests_are_refused_naming_the_field(http, body, param):
    r = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param or err["param"].startswith(param + "."), err
    assert param in err["message"] or err["code"] == "response_not_found", err


def test_the_store_keeps_the_most_recently_used():
    def stored(i: int) -> StoredResponse:
        return StoredResponse({"id": f"resp_{i}", "output": []}, [], [])

    store = ResponseStore(2)
    for i in range(2):
        store.put(f"resp_{i}", stored(i))
    store.get("resp_0")  # now the most recent: resp_1 goes first
    store.put("resp_2", stored(2))
    assert len(store) == 2 and store.get("resp_0") and store.get("resp_2")
    with pytest.raises(Exception, match="not found"):
        store.get("resp_1")
    empty = ResponseStore(0)
    empty.put("resp_0", stored(0))
    assert len(empty) == 0


def test_truncation_auto_drops_the_oldest_turns_to_fit(http, server):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Tell me fact {i} about the sea. " * 4},
                  {"role": "assistant", "content": f"Fact {i}: it is deep and salty. " * 4}]
    turns.append({"role": "user", "content": "Is the sea salty?"})
    short = {"format": {"type": "json_schema", "name": "answer",
                        "schema": {"type": "string", "enum": ["yes", "no"]}}}
    body = {"model": MODEL, "input": turns, "text": short, "temperature": 0,
            "max_output_tokens": server.engine.context_limit - 100}
    assert http.post("/v1/responses", json=body).status_code == 400
    r = http.post("/v1/responses", json={**body, "truncation": "auto"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["truncation"] == "auto" and data["usage"]["input_tokens"] <= 100
    assert data["output"][0]["content"][0]["text"] in ('"yes"', '"no"')
