"""The frameworks people point at a local server, unchanged, against a running peregrine:
LangChain's ChatOpenAI (bind_tools, streamed tool-call chunks, with_structured_output) and
an openai-agents SDK agent that completes a two-tool task with stubbed tools."""

from __future__ import annotations

import asyncio

import jsonschema
import pytest
from pydantic import BaseModel

MODEL = "smollm2-135m"
ASK = "What is the weather in Paris?"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


# --- LangChain --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(server):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(base_url=server.api, api_key="unused", model=MODEL, temperature=0,
                      max_tokens=48, max_retries=0)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return "18 C"


def test_langchain_bind_tools_calls_the_named_and_the_required_tool(llm):
    for choice in ("get_weather", "any"):
        msg = llm.bind_tools([get_weather], tool_choice=choice).invoke(ASK)
        (call,) = msg.tool_calls[:1]
        assert call["name"] == "get_weather" and call["id"]
        jsonschema.validate(call["args"], CITY)


def test_langchain_streamed_tool_call_chunks_add_up_to_the_same_call(llm):
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    whole = bound.invoke(ASK)
    chunks = list(bound.stream(ASK))
    assert len(chunks) > 2  # the arguments arrived in pieces
    summed = chunks[0]
    for c in chunks[1:]:
        summed = summed + c
    assert [(c["name"], c["args"]) for c in summed.tool_calls] == \
        [(c["name"], c["args"]) for c in whole.tool_calls]


class Weather(BaseModel):
    """A weather report."""

    city: str
    celsius: int


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_model(llm, method):
    report = llm.with_structured_output(Weather, method=method).invoke(
        "Report the weather in Paris as JSON.")
    assert isinstance(report, Weather) and isinstance(report.celsius, int)


# --- openai-agents ----------------------------------------------------------------------------
def test_an_agents_sdk_agent_completes_a_two_tool_task(server):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, StopAtTools,
                        function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    called: list[tuple[str, dict[str, str]]] = []

    # Each tool is offered in turn, so even a 135M model walks the task in order: the
    # stubs record their calls, and the second one's answer ends the run.
    @function_tool(is_enabled=lambda ctx, agent: not called)
    def find_city(landmark: str) -> str:
        """The city a landmark is in."""
        called.append(("find_city", {"landmark": landmark}))
        return "Paris"

    @function_tool(is_enabled=lambda ctx, agent: len(called) == 1)
    def get_forecast(city: str) -> str:
        """Tomorrow's forecast for a city."""
        called.append(("get_forecast", {"city": city}))
        return f"Sunny in {city}, 21 C"

    client = AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0)
    agent = Agent(name="planner", instructions="Use the tools to answer.",
                  tools=[find_city, get_forecast],
                  model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", temperature=0,
                                               parallel_tool_calls=False, max_tokens=64),
                  reset_tool_choice=False,
                  tool_use_behavior=StopAtTools(stop_at_tool_names=["get_forecast"]))
    result = asyncio.run(Runner.run(agent, "Where is the Eiffel Tower, and what will the "
                                    "weather be there tomorrow?", max_turns=4))
    assert [name for name, _ in called] == ["find_city", "get_forecast"]
    assert result.final_output == f"Sunny in {called[1][1]['city']}, 21 C"
    # the second request carried the first call and its answer back through the template
    kinds = [getattr(i, "type", None) for i in result.new_items]
    assert kinds.count("tool_call_item") == 2 and kinds.count("tool_call_output_item") == 2


def test_an_agents_sdk_agent_on_the_responses_api_calls_its_tool_and_answers(server):
    from agents import (Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool,
                        set_tracing_disabled)
    from openai import AsyncOpenAI
    set_tracing_disabled(True)
    cities: list[str] = []

    @function_tool
    def get_forecast(city: str) -> str:
        """Tomorrow's forecast for a city."""
        cities.append(city)
        return f"Sunny in {city}, 21 C"

    client = AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0)
    # The SDK's default model class: it speaks /v1/responses. tool_choice resets to auto
    # after the first call, so the second turn answers in text.
    agent = Agent(name="weather", instructions="Use the tools to answer.",
                  tools=[get_forecast],
                  model=OpenAIResponsesModel(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", temperature=0,
                                               parallel_tool_calls=False, max_tokens=64))
    result = asyncio.run(Runner.run(agent, "Weather in Paris tomorrow?", max_turns=3))
    kinds = [getattr(i, "type", None) for i in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert len(cities) == 1 and isinstance(result.final_output, str) and result.final_output
