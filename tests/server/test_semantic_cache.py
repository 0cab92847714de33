"""--semantic-cache on a live server: a reworded question gets the cached answer, marked
(X-Cache: hit, usage.cache) and counted in /metrics; a near-miss does not; the cache never
answers across API keys, answer-changing parameters, system prompts or models; sampled
answers are cached only when asked and `cache: false` bypasses it; a streamed hit carries
the original text; the cache survives a restart; only whole answers are stored, and
evictions by count and by age show in /metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from peregrine.config import EngineConfig
from peregrine.models.sentence_encoder import load_sentence_encoder
from peregrine.outputs import CompletionOutput, RequestOutput
from peregrine.server.args import ServerArgs
from peregrine.server.metrics import ServerMetrics
from peregrine.server.semantic_cache import CacheKey, SemanticCache
from tests.server.conftest import SMALL_KV, RunningServer, parse_metrics, serve

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> Iterator[RunningServer]:
    path = str(tmp_path_factory.mktemp("cache") / "cache.db")
    with serve(ServerArgs(semantic_cache=True, semantic_cache_path=path),
               EngineConfig(**SMALL_KV)) as s:
        yield s


def chat(server: RunningServer, question: str, headers: dict[str, str] | None = None,
         system: str | None = None, **fields) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    r = httpx.post(server.api + "/chat/completions", headers=headers, timeout=120,
                   json={"messages": messages, **GREEDY, **fields})
    assert r.status_code == 200, r.text
    return r


def content(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def streamed(server: RunningServer, question: str) -> tuple[httpx.Headers, str, dict]:
    """The headers, the text and the final usage of a streamed chat request."""
    text, usage = "", {}
    with httpx.stream("POST", server.api + "/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": question}], "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                text += c["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
        return r.headers, text, usage


def test_a_reworded_question_gets_the_cached_answer_marked_and_counted(cached) -> None:
    before = cached.metrics()
    key = {"Authorization": "Bearer sk-1"}
    first = chat(cached, "What is the capital of France?", key)
    assert first.headers["x-cache"] == "miss"
    assert "cache" not in first.json()["usage"]
    again = chat(cached, "What's the capital city of France?", key)
    assert again.headers["x-cache"] == "hit"
    assert content(again) == content(first)
    usage = again.json()["usage"]
    original = first.json()["usage"]
    assert usage["cache"]["hit"] is True and 0.8 <= usage["cache"]["similarity"] < 1
    assert usage["cache"]["saved_tokens"] == original["completion_tokens"]
    assert usage["completion_tokens"] == original["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    after = cached.metrics()
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert grew['peregrine:semantic_cache_requests_total{result="hit"}'] == 1
    assert grew['peregrine:semantic_cache_requests_total{result="miss"}'] == 1
    assert grew["peregrine:semantic_cache_saved_tokens_total"] == original["completion_tokens"]
    assert grew["peregrine:semantic_cache_saved_seconds_total"] > 0
    assert grew["peregrine:semantic_cache_stored_total"] == 1
    assert grew["peregrine:semantic_cache_lookup_seconds_count"] == 2
    assert after["peregrine:semantic_cache_entries"] >= 1
    # OpenAI's client still parses the usage
    client = openai.OpenAI(base_url=cached.api, api_key="sk-1")
    parsed = client.chat.completions.create(
        model=cached.app.state.peregrine.ctx.model_name,
        messages=[{"role": "user", "content": "Tell me the capital of France."}], **GREEDY)
    assert parsed.choices[0].message.content == content(first)
    assert parsed.usage.completion_tokens == original["completion_tokens"]


def test_a_near_miss_goes_to_the_model_and_the_rejection_is_counted(cached) -> None:
    before = cached.metrics()
    assert chat(cached, "What is 15 times 7?").headers["x-cache"] == "miss"
    assert chat(cached, "What is 15 times 8?").headers["x-cache"] == "miss"
    assert chat(cached, "What is 15 times 7?").headers["x-cache"] == "hit"
    after = cached.metrics()
    key = 'peregrine:semantic_cache_rejected_candidates_total{reason="number"}'
    assert after[key] - before.get(key, 0) >= 1


def test_the_cache_never_answers_across_keys_parameters_or_system_prompts(cached) -> None:
    q = "How many legs does a spider have?"
    assert chat(cached, q, {"Authorization": "Bearer alice"}).headers["x-cache"] == "miss"
    assert chat(cached, q, {"Authorization": "Bearer alice"}).headers["x-cache"] == "hit"
    assert chat(cached, q, {"Authorization": "Bearer bob"}).headers["x-cache"] == "miss"
    assert chat(cached, q, {"x-api-key": "alice"}).headers["x-cache"] == "hit"  # same key
    for changed in ({"max_tokens": 5}, {"stop": ["."]}, {"seed": 3},
                    {"response_format": {"type": "json_object"}}, {"top_p": 0.5},
                    {"presence_penalty": 0.5}):
        assert chat(cached, q, {"Authorization": "Bearer alice"},
                    **changed).headers["x-cache"] == "miss", changed
    assert chat(cached, q, {"Authorization": "Bearer alice"},
                system="Answer in French.").headers["x-cache"] == "miss"
    # what does not change the answer does not change the key
    assert chat(cached, q, {"Authorization": "Bearer alice"}, user="someone",
                priority=3).headers["x-cache"] == "hit"


def test_sampled_answers_are_cached_only_when_asked(cached) -> None:
    q = "Name a colour of the rainbow."
    sampled = {"temperature": 0.8, "seed": 7}
    assert chat(cached, q, **sampled).headers["x-cache"] == "bypass"
    assert chat(cached, q, **sampled).headers["x-cache"] == "bypass"
    first = chat(cached, q, cache=True, **sampled)
    assert first.headers["x-cache"] == "miss"
    again = chat(cached, q, cache=True, **sampled)
    assert again.headers["x-cache"] == "hit" and content(again) == content(first)


def test_cache_false_bypasses_a_cached_answer(cached) -> None:
    q = "Who painted the Mona Lisa?"
    chat(cached, q)
    assert chat(cached, q).headers["x-cache"] == "hit"
    r = chat(cached, q, cache=False)
    assert r.headers["x-cache"] == "bypass" and "cache" not in r.json()["usage"]


def test_a_streamed_hit_carries_the_original_text(cached) -> None:
    original = chat(cached, "How do I reverse a list in Python?")
    headers, text, usage = streamed(cached, "How can I reverse a Python list?")
    assert headers["x-cache"] == "hit"
    assert text == content(original)
    assert usage["cache"]["hit"] is True
    assert usage["completion_tokens"] == original.json()["usage"]["completion_tokens"]
    # and a streamed miss is stored like any other answer
    headers, text, _ = streamed(cached, "Why is the sky blue?")
    assert headers["x-cache"] == "miss"
    again = chat(cached, "Why does the sky look blue?")
    assert again.headers["x-cache"] == "hit" and content(again) == text


def test_completions_are_cached_too(cached) -> None:
    body = {"prompt": "The capital of Italy is", "max_tokens": 8, "temperature": 0}
    first = httpx.post(cached.api + "/completions", json=body, timeout=120)
    again = httpx.post(cached.api + "/completions", json=body, timeout=120)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    two = httpx.post(cached.api + "/completions", timeout=120,
                     json={**body, "prompt": ["a", "b"]})
    assert two.headers["x-cache"] == "bypass"  # several prompts: not cached


def test_without_the_flag_there_is_no_cache_and_no_header(server) -> None:
    for _ in range(2):
        r = chat(server, "What is the capital of France?")
        assert "x-cache" not in r.headers and "cache" not in r.json()["usage"]


def test_the_cache_survives_a_restart_and_stays_per_model(tmp_path) -> None:
    path = str(tmp_path / "cache.db")

    def args(name: str) -> ServerArgs:
        return ServerArgs(semantic_cache=True, semantic_cache_path=path,
                          served_model_name=name)
    with serve(args("smol"), EngineConfig(**SMALL_KV)) as first:
        answer = content(chat(first, "Who wrote Pride and Prejudice?"))
    with serve(args("smol"), EngineConfig(**SMALL_KV)) as again:
        r = chat(again, "Who is the author of Pride and Prejudice?")
        assert r.headers["x-cache"] == "hit" and content(r) == answer
        assert again.metrics()["peregrine:semantic_cache_entries"] == 1
    with serve(args("another-model"), EngineConfig(**SMALL_KV)) as other:
        assert chat(other, "Who wrote Pride and Prejudice?").headers["x-cache"] == "miss"


# --- the cache object itself: what is stored, eviction and expiry as /metrics shows them ---
def _output(text: str, reason: str | None = "stop", n: int = 1) -> RequestOutput:
    return RequestOutput("r", None, [1, 2], [
        CompletionOutput(i, text, [7, 8, 9], finish_reason=reason) for i in range(n)],
        finished=True)


def test_only_whole_answers_are_stored_and_evictions_are_counted() -> None:
    encoder = load_sentence_encoder()
    metrics = ServerMetrics("m", lambda: None)
    now = [1000.0]

    async def load():
        return encoder
    cache = SemanticCache(ServerArgs(semantic_cache=True, semantic_cache_max_entries=2,
                                     semantic_cache_ttl=60), metrics, load,
                          clock=lambda: now[0])

    async def status(question: str, answer: RequestOutput | None = None) -> str:
        probe = await cache.probe(CacheKey("k", question), None)
        if answer is not None:
            await probe.store(answer)
        return probe.status

    async def run() -> None:
        assert await status("Why is the sky blue?", _output("cut", reason="abort")) == "miss"
        assert await status("Why is the sky blue?", _output("two", n=2)) == "miss"
        assert await status("Why is the sky blue?", _output("running", reason=None)) == "miss"
        assert len(cache.storage) == 0  # aborted, several choices, unfinished: none kept
        for q in ("What is the capital of France?", "Who wrote Hamlet?",
                  "How many legs does a spider have?"):
            assert await status(q, _output(f"answer to {q}")) == "miss"
        assert await status("What is the capital of France?") == "miss"  # evicted (LRU)
        assert await status("Who wrote Hamlet?") == "hit"
        now[0] += 60
        assert await status("Who wrote Hamlet?") == "miss"  # expired
        await status("Why is the sky blue?", _output("Rayleigh scattering."))
        cache.close()
    asyncio.run(run())
    m = parse_metrics(metrics.render().decode())
    assert m['peregrine:semantic_cache_evicted_total{reason="entries"}'] == 1
    assert m['peregrine:semantic_cache_evicted_total{reason="ttl"}'] == 2
    assert m["peregrine:semantic_cache_stored_total"] == 4
    assert m["peregrine:semantic_cache_entries"] == 1
    assert m["peregrine:semantic_cache_saved_tokens_total"] == 3


def test_the_cache_needs_the_embedding_model_and_a_sane_threshold() -> None:
    with pytest.raises(ValueError, match="embedding model"):
        ServerArgs(semantic_cache=True, embedding_model="none")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            ServerArgs(semantic_cache=True, semantic_cache_threshold=bad)
    assert ServerArgs().semantic_cache is False  # off by default
