"""A server that speculates: same greedy text as the plain server, streamed or not, and
the acceptance counters on /metrics."""

from __future__ import annotations

import json

import httpx

from peregrine.config import EngineConfig
from peregrine.server.app import ServerArgs
from tests.server.conftest import SMALL_KV, serve

PROMPT = ("Copy this list exactly: apples, pears, plums, cherries, apples, pears, plums, "
          "cherries, apples, pears, plums, cherries.")


def test_speculative_server_streams_the_same_text_and_reports_acceptance(server):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
            "temperature": 0}
    want = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    want_text = want["choices"][0]["message"]["content"]
    with serve(ServerArgs(), EngineConfig(**SMALL_KV, speculative="ngram")) as spec:
        got = httpx.post(spec.url + "/v1/chat/completions", json=body, timeout=120).json()
        assert got["choices"][0]["message"]["content"] == want_text
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
        with httpx.stream("POST", spec.url + "/v1/chat/completions", timeout=120,
                          json={**body, "stream": True}) as r:
            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
        chunks = [json.loads(ln) for ln in lines[:-1]]
        assert lines[-1] == "[DONE]"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"]) == want_text
        m = spec.wait_idle()
        drafts = m["peregrine:spec_decode_num_draft_tokens_total"]
        accepted = m["peregrine:spec_decode_num_accepted_tokens_total"]
        assert 0 < accepted <= drafts
        assert m["peregrine:spec_decode_acceptance_rate"] == accepted / drafts
        assert 'peregrine:spec_decode_acceptance_by_position{model_name="smollm2-135m",' \
               'position="0"}' in httpx.get(spec.url + "/metrics").text
