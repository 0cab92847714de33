"""--max-queue-len (429 with Retry-After, running requests unaffected) and --api-key (401)."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from tests.server.test_errors import assert_error

KEY = {"Authorization": "Bearer sk-test-key"}


def _chat(max_tokens: int, stream: bool = False) -> dict:
    return {"model": "smol", "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


def test_api_key_is_required_on_api_routes(strict_server):
    url = strict_server.url
    for method, path, body in [("POST", "/v1/chat/completions", _chat(2)),
                               ("POST", "/v1/completions", {"prompt": "a"}),
                               ("GET", "/v1/models", None),
                               ("POST", "/tokenize", {"prompt": "a"}),
                               ("POST", "/detokenize", {"tokens": [1]})]:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test-key"},
                        {"Authorization": "Basic sk-test-key"}]:
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=30)
            err = assert_error(r, 401)
            assert err["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", headers=KEY).json()["data"][0]["id"] == "smol"
    # Liveness, metrics and the playground page stay open.
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/").status_code == 200


def test_openai_client_with_the_key(strict_server):
    client = openai.OpenAI(base_url=strict_server.api, api_key="sk-test-key", max_retries=0)
    r = client.chat.completions.create(model="smol", max_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert r.usage.completion_tokens > 0 and r.model == "smol"
    bad = openai.OpenAI(base_url=strict_server.api, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_full_queue_gets_429_and_running_requests_finish(strict_server):
    """One sequence runs (max_num_seqs=1), one waits (max_queue_len=1), the third is refused."""
    url = strict_server.url
    first_token = threading.Event()
    results: dict[str, dict] = {}

    def running() -> None:
        text, finish = "", None
        # long enough to still be running when the third request comes, on a fast machine too
        with httpx.stream("POST", url + "/v1/chat/completions", json=_chat(160, stream=True),
                          headers=KEY, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
                if text:
                    first_token.set()
        results["running"] = {"text": text, "finish": finish}

    def waiting() -> None:
        r = httpx.post(url + "/v1/chat/completions", json=_chat(4), headers=KEY, timeout=300)
        results["waiting"] = r.json()

    t1 = threading.Thread(target=running)
    t1.start()
    assert first_token.wait(120)
    t2 = threading.Thread(target=waiting)
    t2.start()
    deadline = 200
    while strict_server.engine.num_waiting < 1 and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert strict_server.engine.num_waiting == 1

    r = httpx.post(url + "/v1/chat/completions", json=_chat(4), headers=KEY, timeout=30)
    err = assert_error(r, 429, None, "max-queue-len")
    assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1

    t1.join(300)
    t2.join(300)
    assert results["running"]["finish"] == "length" and results["running"]["text"]
    assert results["waiting"]["usage"]["completion_tokens"] == 4
    m = strict_server.wait_idle()
    assert m['peregrine:request_rejected_total{reason="queue_full"}'] >= 1
    assert m["peregrine:kv_cache_usage"] == 0
