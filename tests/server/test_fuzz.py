"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis):
valid and invalid requests to every route, none answered 5xx, every 4xx in OpenAI's error
shape, every status documented, and the server alive and holding no KV block afterwards.
Plus Hypothesis strategies on the request models: whatever JSON comes in, parsing either
succeeds or raises an APIError (a 4xx), never anything else."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)

from peregrine.config import EngineConfig
from peregrine.server.app import ServerArgs
from peregrine.server.errors import APIError
from tests.server.conftest import RunningServer, serve

# Examples per route and generation mode; CI runs every route at this bound (minutes, not
# hours: generation is bounded by the server's small context below).
EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RunningServer]:
    """SmolLM2 with a 96-token context and a 4-token default answer: every valid request
    the fuzzer makes is cheap to serve."""
    args = ServerArgs(max_tokens_default=4, max_queue_len=32)
    config = EngineConfig(kv_cache_memory=0.25, max_model_len=96)
    with serve(args, config) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RunningServer):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


ROUTES = ["POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings",
          "POST /v1/messages", "POST /v1/messages/count_tokens", "POST /v1/responses",
          "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
          "GET /v1/responses/{response_id}/input_items", "POST /tokenize",
          "POST /detokenize", "GET /v1/models", "GET /health", "GET /metrics", "GET /version"]
ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens")
# Requests the schema allows (positive) and requests it forbids (negative); a route
# without a body or query parameters has no forbidden form.
CASES = [(route, mode) for route in ROUTES for mode in (GenerationMode.POSITIVE,
                                                         GenerationMode.NEGATIVE)
         if route.startswith("POST") or route.endswith("input_items")
         or mode is GenerationMode.POSITIVE]


def error_in_openai_shape(response, route: str) -> None:
    """Every 4xx body is {"error": {"message", "type", "param", "code"}} (Anthropic's
    {"type": "error", "error": {"type", "message"}} on its routes)."""
    if 400 <= response.status_code < 500 and route.split()[1] in ANTHROPIC:
        body = response.json()
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    elif 400 <= response.status_code < 500:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("route,mode", CASES, ids=[f"{r}-{m.value}" for r, m in CASES])
def test_every_route_survives_the_fuzzer(api_schema, route, mode):
    operation = api_schema.find_operation_by_label(route)
    assert operation is not None, f"{route} is missing from /openapi.json"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def fuzz(case) -> None:
        response = case.call(timeout=120)
        # A streamed 200 is text/event-stream, whose body the schema cannot describe.
        media = response.headers.get("content-type") or [""]
        stream = media[0].startswith("text/event-stream")
        checks = [not_a_server_error, status_code_conformance, content_type_conformance]
        if not stream:
            checks.append(response_schema_conformance)
        case.validate_response(response, checks=checks)
        error_in_openai_shape(response, route)

    fuzz()


def test_alive_and_drained_after_the_fuzzer(fuzz_server):
    import httpx
    r = httpx.post(fuzz_server.api + "/completions", timeout=60,
                   json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200
    m = fuzz_server.wait_idle()
    assert m["peregrine:kv_cache_usage"] == 0
    assert m["peregrine:num_requests_running"] == 0


# --- Hypothesis on the request models ------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
FIELDS = ["model", "prompt", "messages", "max_tokens", "n", "best_of", "temperature",
          "top_p", "top_k", "stop", "stream", "logprobs", "top_logprobs", "logit_bias",
          "seed", "response_format", "echo", "stop_token_ids", "priority", "use_beam_search",
          "beam_width", "stream_options", "structured_outputs", "guided_json",
          "chat_template_kwargs", "max_completion_tokens", "min_tokens", "input",
          "encoding_format", "dimensions", "truncate_prompt_tokens", "pooling",
          "instructions", "tool_choice", "tools", "text", "max_output_tokens"]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions",
                                   "/v1/embeddings", "/v1/responses"])
@given(body=bodies)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
def test_parsing_any_json_is_a_request_or_a_4xx(route, body):
    """The parse step alone (no engine): a valid model, or an APIError with a 4xx status."""
    import asyncio

    from peregrine.server.app import parse_body
    from peregrine.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                           EmbeddingRequest)
    from peregrine.server.responses_protocol import ResponsesRequest

    model = {"/v1/completions": CompletionRequest, "/v1/chat/completions":
             ChatCompletionRequest, "/v1/embeddings": EmbeddingRequest,
             "/v1/responses": ResponsesRequest}[route]
    request = _FakeRequest(body)
    try:
        asyncio.run(parse_body(request, model))  # type: ignore[arg-type]
    except APIError as e:
        assert 400 <= e.status < 500 and e.message


class _FakeRequest:
    """Just what parse_body reads of a request: the body and the server's args."""

    def __init__(self, body: dict) -> None:
        import json
        from types import SimpleNamespace
        self._body = json.dumps(body).encode()
        self.app = SimpleNamespace(state=SimpleNamespace(peregrine=SimpleNamespace(
            args=ServerArgs())))

    async def body(self) -> bytes:
        return self._body
