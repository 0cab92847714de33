"""Several models behind one server: routing, load on demand beside a live stream, eviction
(model count and memory budget) that never drops in-flight requests, keep-alive, admin
routes, per-model metrics, and each model's greedy output equal to serving it alone."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from peregrine.config import EngineConfig
from peregrine.server.app import create_app
from peregrine.server.args import ServerArgs
from peregrine.server.model_entries import ModelEntry, estimate_memory

from tests.conftest import tiny_config_dir
from tests.server.conftest import RunningServer, serve

PROMPT = "The capital of France is"
KV = dict(kv_cache_memory=0.1)


def smol(**kw: Any) -> EngineConfig:
    return EngineConfig(**{**KV, **kw})


def tiny(path: str, **kw: Any) -> EngineConfig:
    # the default model's tokenizer (a config-only directory) needs its vocabulary
    return EngineConfig(model=path, load_format="dummy", **{**KV, **kw})


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[str, str]:
    return (tiny_config_dir(tmp_path_factory, vocab_size=49152),
            tiny_config_dir(tmp_path_factory, vocab_size=49152, num_hidden_layers=3))


@contextlib.contextmanager
def serve_models(args: ServerArgs, entries: list[ModelEntry]) -> Iterator[RunningServer]:
    with serve(args, app=create_app(args, entries[0].config, entries)) as s:
        yield s


def complete(url: str, model: str | None, max_tokens: int = 8, key: str | None = None,
             **kw: Any) -> httpx.Response:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **kw}
    if model is not None:
        body["model"] = model
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)


def states(url: str, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
    return {m["id"]: m["state"] for m in data if m["task"] == "generate"}


class Stream:
    """A streamed completion read on a thread: its text, its finish reason, whether [DONE]
    came, and an event set once its first chunk arrived."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        self.first = threading.Event()
        self.text, self.finish, self.done, self.error = "", None, False, None
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True}
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        self.text += choice["text"]
                        self.finish = choice["finish_reason"] or self.finish
                        self.first.set()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.first.set()

    def result(self) -> tuple[str | None, bool]:
        self.thread.join(120)
        assert self.error is None, self.error
        return self.finish, self.done


@pytest.fixture(scope="module")
def budget_server(tiny_dirs) -> Iterator[RunningServer]:
    """smol (default, alias `small`), tiny-a and tiny-b under a memory budget that holds
    smol and one tiny model."""
    entries = [ModelEntry("smol", smol(), ["small"]), ModelEntry("tiny-a", tiny(tiny_dirs[0])),
               ModelEntry("tiny-b", tiny(tiny_dirs[1]), ["tb"])]
    mem = [estimate_memory(e.config) for e in entries]
    budget = mem[0] + max(mem[1], mem[2]) + min(mem[1], mem[2]) // 2
    args = ServerArgs(memory_budget=budget, keep_alive=0, embedding_model=None)
    with serve_models(args, entries) as s:
        yield s


def test_requests_route_by_served_name_and_alias(budget_server):
    url = budget_server.url
    for asked, served in [("smol", "smol"), ("small", "smol"), (None, "smol"),
                          ("tiny-a", "tiny-a"), ("tb", "tiny-b")]:
        r = complete(url, asked)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == served
    r = complete(url, "gpt-4")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "`smol`, `tiny-a`, `tiny-b`" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": "tb", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["model"] == "tiny-b"


def test_models_lists_states_and_estimated_memory(budget_server):
    complete(budget_server.url, "tiny-a")
    complete(budget_server.url, "smol")
    data = httpx.get(budget_server.url + "/v1/models").json()["data"]
    cards = {m["id"]: m for m in data}
    assert list(cards) == ["smol", "tiny-a", "tiny-b"]
    assert cards["smol"]["aliases"] == ["small"] and cards["tiny-b"]["aliases"] == ["tb"]
    assert cards["smol"]["state"] == "loaded" and cards["tiny-a"]["state"] == "loaded"
    assert cards["tiny-b"]["state"] == "unloaded"  # the budget holds one tiny model
    assert all(c["memory_bytes"] > 0 for c in cards.values())
    assert cards["smol"]["max_model_len"] > 0 and cards["tiny-b"]["max_model_len"] is None


def test_memory_budget_evicts_the_least_recently_used_idle_model(budget_server):
    url = budget_server.url
    complete(url, "tiny-a")
    complete(url, "smol")  # tiny-a is now the least recently used
    assert complete(url, "tiny-b").status_code == 200
    assert states(url) == {"smol": "loaded", "tiny-a": "unloaded", "tiny-b": "loaded"}
    complete(url, "smol")  # now tiny-b is
    assert complete(url, "tiny-a").status_code == 200
    assert states(url) == {"smol": "loaded", "tiny-a": "loaded", "tiny-b": "unloaded"}
    complete(url, "tiny-a")  # and now smol is: it goes, though tiny-b needs less room
    assert complete(url, "tiny-b").status_code == 200
    assert states(url) == {"smol": "unloaded", "tiny-a": "loaded", "tiny-b": "loaded"}


def test_a_model_loads_on_demand_while_another_streams(budget_server):
    url = budget_server.url
    complete(url, "tiny-a")
    complete(url, "smol")  # tiny-b must load: tiny-a (idle) makes room, not the busy smol
    stream = Stream(url, "smol", max_tokens=48)
    assert stream.first.wait(60)
    r = complete(url, "tiny-b")
    assert r.status_code == 200, r.text
    assert stream.result() == ("length", True)  # not interrupted


def test_metrics_carry_each_models_name_once_per_family(budget_server):
    url = budget_server.url
    complete(url, "smol")
    complete(url, "tiny-b")
    text = httpx.get(url + "/metrics").text
    helps = [line for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))  # one HELP per family: the registries merged
    for model in ("smol", "tiny-b"):
        assert ('peregrine:request_success_total{finished_reason="length",'
                f'model_name="{model}"}}') in text
        assert f'peregrine:kv_cache_blocks{{model_name="{model}"}}' in text
    # the two engines' steps took turns under the fair arbiter
    busy = budget_server.app.state.peregrine.router.arbiter.busy_seconds
    assert busy["smol"] > 0 and busy["tiny-b"] > 0


def test_greedy_output_equals_serving_each_model_alone(budget_server, server, tiny_dirs):
    together = {m: complete(budget_server.url, m, 12).json()["choices"][0]["text"]
                for m in ("smol", "tiny-b")}
    assert complete(server.url, None, 12).json()["choices"][0]["text"] == together["smol"]
    with serve(ServerArgs(embedding_model=None), tiny(tiny_dirs[1])) as alone:
        assert complete(alone.url, None, 12).json()["choices"][0]["text"] == together["tiny-b"]


KEY = "sk-router"


def test_one_loaded_model_busy_models_are_kept_keep_alive_and_admin_routes(tiny_dirs):
    entries = [ModelEntry("smol", smol()), ModelEntry("tiny", tiny(tiny_dirs[0]))]
    args = ServerArgs(max_loaded_models=1, keep_alive=3.0, api_key=KEY, embedding_model=None)
    with serve_models(args, entries) as s:
        auth = {"Authorization": f"Bearer {KEY}"}
        # admin routes want the key
        assert httpx.post(s.url + "/v1/models/tiny/load").status_code == 401
        # smol loads at startup; keep-alive counts from then, so on a slow machine it may
        # already have idled out (the stream below loads it again on demand)
        assert states(s.url, KEY) in ({"smol": "loaded", "tiny": "unloaded"},
                                      {"smol": "unloaded", "tiny": "unloaded"})

        # smol streams: tiny cannot load (smol is busy); the stream is not interrupted
        body = {"model": "smol", "prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=auth,
                          timeout=120) as streamed:
            lines = streamed.iter_lines()
            assert next(lines).startswith("data: ")
            r = complete(s.url, "tiny", key=KEY)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "model_capacity"
            assert int(r.headers["retry-after"]) > 0
            r = httpx.post(s.url + "/v1/models/smol/unload", headers=auth)
            assert r.status_code == 409 and r.json()["error"]["code"] == "model_busy"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in "".join(rest).replace(" ", "")

        # idle now: tiny loads, smol goes (one model at a time)
        assert complete(s.url, "tiny", key=KEY).status_code == 200
        assert states(s.url, KEY) == {"smol": "unloaded", "tiny": "loaded"}

        # keep-alive: tiny unloads once idle for 3 s
        deadline = time.monotonic() + 15
        while states(s.url, KEY)["tiny"] != "unloaded":
            assert time.monotonic() < deadline, "tiny was not unloaded after --keep-alive"
            time.sleep(0.25)

        # admin load and unload
        r = httpx.post(s.url + "/v1/models/smol/load", headers=auth, timeout=120)
        assert r.status_code == 200 and r.json()["state"] == "loaded", r.text
        r = httpx.post(s.url + "/v1/models/smol/unload", headers=auth)
        assert r.status_code == 200 and r.json()["state"] == "unloaded"
        assert httpx.post(s.url + "/v1/models/nope/load", headers=auth).status_code == 404
        assert httpx.get(s.url + "/health").status_code == 200  # nothing loaded is fine
