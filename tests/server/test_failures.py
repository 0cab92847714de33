"""A failure inside one request (or one engine step) fails that request with a 500 in
OpenAI's shape; the server, and every other request, lives on."""

from __future__ import annotations

import json

import pytest

import peregrine.server.serving as serving
from tests.server.test_errors import assert_error

CHAT = "/v1/chat/completions"


@pytest.fixture
def failing_step(server):
    """Make every engine step that runs a prompt containing FAIL-ME raise."""
    runner = server.engine.engine.runner
    real = runner.execute

    def execute(batch):
        if any("FAIL-ME" in (s.request.prompt or "") for s in batch.seqs):
            raise RuntimeError("simulated kernel fault")
        return real(batch)

    runner.execute = execute
    yield
    runner.execute = real


def _chat(content: str, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, "stream": stream}


def test_a_failed_engine_step_is_a_500_and_frees_its_blocks(server, http, failing_step):
    error_key = 'peregrine:request_success_total{finished_reason="error"}'
    before = server.metrics().get(error_key, 0)
    err = assert_error(http.post(CHAT, json=_chat("FAIL-ME please")), 500, None,
                       "simulated kernel fault")
    assert err["type"] == "server_error" and err["code"] == "engine_error"

    with http.stream("POST", CHAT, json=_chat("FAIL-ME streaming", stream=True)) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_error"

    ok = http.post(CHAT, json=_chat("Hello"))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0
    m = server.wait_idle()
    assert m["peregrine:kv_cache_usage"] == 0
    assert m[error_key] - before == 2


def test_an_exception_in_a_handler_is_a_500_and_the_server_lives_on(server, http,
                                                                    monkeypatch):
    real = serving.chat_messages

    def broken(messages):
        if any("BREAK-HANDLER" in str(m.content) for m in messages):
            raise RuntimeError("bug in request handling")
        return real(messages)

    monkeypatch.setattr(serving, "chat_messages", broken)
    err = assert_error(http.post(CHAT, json=_chat("BREAK-HANDLER")), 500, None,
                       "bug in request handling")
    assert err["type"] == "server_error"
    ok = http.post(CHAT, json=_chat("Hello"))
    assert ok.status_code == 200
    assert server.wait_idle()["peregrine:kv_cache_usage"] == 0
