"""Replicas on Ray Serve: the routing decision with fake replicas (fast), then two real
replicas of SmolLM2 on a local Ray instance behind the ingress: OpenAI clients, greedy output
equal to one engine's, prefix affinity, metrics, and a replica killed mid-run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("ray.serve")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402
from ray.serve.request_router import PendingRequest, ReplicaID  # noqa: E402

from peregrine.config import EngineConfig  # noqa: E402
from peregrine.server.args import ServerArgs  # noqa: E402
from peregrine.server.prefix_routing import (PrefixTable, prefix_hashes, prompt_text,  # noqa: E402
                                             rank_replicas)
from peregrine.server.ray_args import RayArgs  # noqa: E402
from peregrine.server.ray_router import PREFIX_KWARG, REPLICA_KWARG, PrefixAwareRouter  # noqa: E402
from peregrine.server.ray_serve import (APP_NAME, REPLICA, REPLICA_HEADER, build,  # noqa: E402
                                        replica_options, split_args)
from peregrine.server.relay import broken_stream_event, carries_output  # noqa: E402
from peregrine.server.replica_metrics import merge_replica_metrics  # noqa: E402
from tests.server.conftest import parse_metrics  # noqa: E402

SYSTEM = ("You are a meticulous assistant for a library. Answer in one short sentence, "
          "and never invent titles, authors or dates that you are not sure about. ") * 3


# --- the routing decision, with fake replicas ---------------------------------------------------
def test_prompt_text_and_hashes_share_a_prefix():
    chat = lambda q: {"messages": [{"role": "system", "content": SYSTEM},  # noqa: E731
                                   {"role": "user", "content": q}]}
    a, b = prefix_hashes(prompt_text(chat("Who wrote Emma?"))), \
        prefix_hashes(prompt_text(chat("When did the library open?")))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= len(SYSTEM) // 64 - 1  # the system prompt's blocks are common
    assert prompt_text({"prompt": [[1, 2, 3], [4]]}) == "1 2 3"
    assert prompt_text({"prompt": ["abc", "def"]}) == "abc"
    assert prompt_text({"model": "x"}) is None
    assert len(prefix_hashes("short")) == 1
    assert len(prefix_hashes("x" * 10_000, 64, 8)) == 8
    with pytest.raises(ValueError):
        prefix_hashes("x", 0)


def test_rank_prefers_the_replica_holding_the_prefix_unless_it_is_swamped():
    rng = random.Random(0)
    table = PrefixTable()
    hashes = prefix_hashes(SYSTEM + "first question")
    table.record(hashes[:5], "r1")
    owner, depth = table.lookup(prefix_hashes(SYSTEM + "another question"))
    assert (owner, depth) == ("r1", 5)
    assert table.lookup(hashes, alive={"r0": 1})[0] is None  # r1 is gone
    queues = {"r0": 0, "r1": 3, "r2": 1}
    ranks = rank_replicas("r1", queues, max_imbalance=4, rng=rng)
    assert ranks[0] == ["r1"] and "r1" not in ranks[1]
    ranks = rank_replicas("r1", {"r0": 0, "r1": 9, "r2": 1}, max_imbalance=4, rng=rng)
    assert ranks[0] == ["r0"]  # too far behind: the least loaded instead
    ranks = rank_replicas(None, {"r0": 2, "r1": 0}, max_imbalance=4, rng=rng)
    assert ranks[0] == ["r1"]
    assert rank_replicas(None, {}, 4, rng) == []
    table.forget("r1")
    assert len(table) == 0
    small = PrefixTable(capacity=3)
    small.record([1, 2, 3, 4], "r0")
    assert len(small) == 3 and small.lookup([1])[0] is None


def _fake_replica(uid: str, dep: DeploymentID) -> SimpleNamespace:
    return SimpleNamespace(replica_id=ReplicaID(uid, dep), max_ongoing_requests=8)


def test_the_ray_router_sends_a_shared_prefix_to_one_replica():
    """The real RequestRouter subclass, fed fake replicas and queue lengths."""
    async def scenario() -> None:
        dep = DeploymentID(name=REPLICA, app_name="test")
        router = PrefixAwareRouter(deployment_id=dep,
                                   handle_source=DeploymentHandleSource.UNKNOWN,
                                   use_replica_queue_len_cache=True)
        router.initialize_state(affinity=True, max_imbalance=2, seed=1)
        replicas = [_fake_replica(u, dep) for u in ("a", "b", "c")]

        def pending(text: str) -> PendingRequest:
            return PendingRequest(args=[], kwargs={PREFIX_KWARG: prefix_hashes(text)},
                                  metadata=SimpleNamespace(internal_request_id=text))

        first = pending(SYSTEM + "q0")
        ranks = await router.choose_replicas(replicas, first)
        chosen = ranks[0][0].replica_id
        router.on_request_routed(first, chosen, None)
        for i in range(1, 6):
            req = pending(SYSTEM + f"q{i}")
            ranks = await router.choose_replicas(replicas, req)
            assert ranks[0][0].replica_id == chosen
            router.on_request_routed(req, chosen, None)
        assert (router.routed, router.affinity_hits) == (6, 5)
        # a burst: requests of a new prefix ranked before any of them was placed
        burst = [pending("Another group's prompt, long enough to fill blocks. " * 4 + str(i))
                 for i in range(3)]
        firsts = {(await router.choose_replicas(replicas, b))[0][0].replica_id for b in burst}
        assert len(firsts) == 1
        # the holder's queue grows past the imbalance: the next one goes elsewhere
        router.replica_queue_len_cache.update(chosen, 5)
        ranks = await router.choose_replicas(replicas, pending(SYSTEM + "q9"))
        assert ranks[0][0].replica_id != chosen
        # a call may name its replica
        ranks = await router.choose_replicas(
            replicas, PendingRequest(args=[], kwargs={REPLICA_KWARG: "c"},
                                     metadata=SimpleNamespace(internal_request_id="m")))
        assert [r.replica_id.unique_id for r in ranks[0]] == ["c"]
        router.on_replica_actor_died(chosen)
        assert router.table.lookup(prefix_hashes(SYSTEM + "q0"))[0] not in (None, chosen)

    asyncio.run(scenario())


def test_relay_holds_back_only_a_chat_streams_role_chunk():
    lead = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, ' \
           b'"logprobs": null, "finish_reason": null}]}\n\n'
    token = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, ' \
            b'"finish_reason": null}]}\n\n'
    assert not carries_output(lead)
    assert carries_output(token) and carries_output(lead + token)
    assert carries_output(b"data: [DONE]\n\n")
    assert carries_output(b"event: message_start\ndata: {}\n\n")
    assert b"replica_died" in broken_stream_event("/v1/chat/completions", "x")
    assert broken_stream_event("/v1/messages", "x").startswith(b"event: error")


def test_replica_metrics_are_merged_under_a_replica_label():
    text = ('# HELP peregrine:prefix_cache_hits_total hits\n'
            '# TYPE peregrine:prefix_cache_hits_total counter\n'
            'peregrine:prefix_cache_hits_total{model_name="m"} %d\n')
    merged = merge_replica_metrics({"a": text % 3, "b": (text % 5).encode()}).decode()
    assert merged.count("# TYPE peregrine:prefix_cache_hits_total counter") == 1
    assert 'peregrine:prefix_cache_hits_total{model_name="m",replica="a"} 3.0' in merged
    assert 'peregrine:prefix_cache_hits_total{model_name="m",replica="b"} 5.0' in merged


def test_config_args_are_split_and_checked():
    server, config, ray_args = split_args({"num-replicas": 3, "kv_cache_memory": 0.5,
                                           "api_key": "k", "min_replicas": 1,
                                           "max_replicas": 4})
    assert (ray_args.num_replicas, ray_args.autoscaling) == (3, True)
    assert (config.kv_cache_memory, server.api_key) == (0.5, "k")
    options = replica_options(server, config, ray_args)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 3,
        "target_ongoing_requests": 8.0, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
    assert options["max_ongoing_requests"] == config.max_num_seqs
    fixed = replica_options(server, config, RayArgs(num_replicas=2, ray_router="balanced"))
    assert fixed["num_replicas"] == 2
    assert fixed["request_router_config"].request_router_kwargs["affinity"] is False
    # `serve run peregrine.server.ray_serve:app num_replicas=2 ...` passes text
    server, config, ray_args = split_args({"num_replicas": "2", "kv_cache_memory": "0.5",
                                           "max_model_len": "none", "ray": "true",
                                           "ray_router": "balanced", "max_retries": "0"})
    assert (ray_args.num_replicas, ray_args.ray, ray_args.ray_router, ray_args.max_retries) \
        == (2, True, "balanced", 0)
    assert (config.kv_cache_memory, config.max_model_len) == (0.5, None)
    with pytest.raises(ValueError, match="unknown peregrine serve options: bogus"):
        split_args({"bogus": 1})
    with pytest.raises(ValueError, match="both --min-replicas and --max-replicas"):
        RayArgs(min_replicas=1)
    with pytest.raises(ValueError, match="num-replicas"):
        RayArgs(num_replicas=0)


def test_the_documented_serve_config_is_valid():
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "ray_serve.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    application = config.applications[0]
    assert application.import_path == "peregrine.server.ray_serve:app"
    _, engine, ray_args = split_args(application.args)
    assert (ray_args.num_replicas, engine.max_model_len) == (2, 2048)
    # what `serve run` / a config's import_path does with the builder and its args
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from peregrine.server import ray_serve
    built = call_user_app_builder_with_args_if_necessary(
        ray_serve.app, {"num_replicas": "2", "kv_cache_memory": "0.5"})
    assert isinstance(built, serve.Application)
    with pytest.raises(ValueError, match="unknown peregrine serve options: num_replica"):
        call_user_app_builder_with_args_if_necessary(ray_serve.app, {"num_replica": "2"})


# --- two real replicas --------------------------------------------------------------------------
ENGINE = dict(kv_cache_memory=0.25, max_model_len=1024, num_threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray instance (2 CPUs) serving 2 replicas; yields the base URL."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(ServerArgs(), EngineConfig(**ENGINE),
                        RayArgs(num_replicas=2, replica_cpus=1, route_max_imbalance=8)),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    """One plain engine with the replicas' settings: the greedy answers to match."""
    from peregrine import LLM
    with LLM(**ENGINE) as llm:
        yield llm


def _client(url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


PROMPTS = ["The capital of France is", "Once upon a time, in a small village,"]
QUESTION = [{"role": "user", "content": "Name three fruits."}]


def test_openai_client_gets_the_single_engine_answers(cluster, reference):
    from peregrine import SamplingParams
    client = _client(cluster)
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = [o.outputs[0].text for o in reference.generate(PROMPTS, params)]
    expected_chat = reference.chat(QUESTION, params)[0].outputs[0].text
    for prompt, want in zip(PROMPTS, expected):
        r = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=24,
                                      temperature=0)
        assert r.choices[0].text == want
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="smollm2-135m", prompt=prompt, max_tokens=24, temperature=0, stream=True)
            if c.choices)
        assert streamed == want
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=24,
                                       temperature=0)
    assert r.choices[0].message.content == expected_chat
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=QUESTION,
                                                 max_tokens=24, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == expected_chat


def test_routes_and_errors_are_the_servers(cluster):
    models = httpx.get(cluster + "/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == "smollm2-135m"
    assert httpx.get(cluster + "/health", timeout=30).status_code == 200
    bad = httpx.post(cluster + "/v1/completions", json={"prompt": "x", "max_tokens": -1},
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    unknown = httpx.post(cluster + "/v1/chat/completions", timeout=30,
                         json={"model": "nope", "messages": QUESTION})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    broken = httpx.post(cluster + "/v1/completions", content=b"{not json", timeout=30,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(cluster + "/v1/completions", content=b"x" * (5 * 2**20), timeout=30)
    assert huge.status_code == 413


def test_shared_prefixes_go_to_one_replica_and_metrics_name_both(cluster):
    client = httpx.Client(base_url=cluster, timeout=120)

    def ask(system: str, i: int) -> str:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
            "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.headers[REPLICA_HEADER.decode()]

    groups = {g: [ask(f"Group {g}. " + SYSTEM, i) for i in range(4)] for g in "AB"}
    for g, served in groups.items():
        assert len(set(served)) == 1, f"group {g} was split over replicas: {served}"
    text = client.get("/metrics").text
    m = parse_metrics(text)
    replicas = {k.split('replica="')[1].split('"')[0] for k in m if 'replica="' in k}
    assert set(groups["A"]) | set(groups["B"]) <= replicas and len(replicas) == 2
    served = set(groups["A"]) | set(groups["B"])
    hits = {r: m.get(f'peregrine:prefix_cache_hits_total{{replica="{r}"}}', 0) for r in served}
    assert all(h > 0 for h in hits.values()), hits  # the follow-ups hit their replica's cache
    assert m["peregrine:ray_prefix_affinity"] >= 6 and m["peregrine:ray_replicas"] == 2


def _replicas(app_name: str, states: tuple[str, ...] = ("STARTING", "UPDATING",
                                                          "RECOVERING", "RUNNING")) -> int:
    """Replicas of the engine deployment in `states` (by default: all not stopping)."""
    status = serve.status().applications.get(app_name)
    if status is None or REPLICA not in status.deployments:
        return 0
    counts = status.deployments[REPLICA].replica_states
    return sum(counts.get(state, 0) for state in states)


def _wait_for_replicas(n: int, app_name: str = APP_NAME, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _replicas(app_name, ("RUNNING",)) < n:
        assert time.monotonic() < deadline, f"{n} replicas did not come back"
        time.sleep(0.5)


def test_a_stream_whose_replica_dies_before_its_first_token_is_sent_elsewhere(cluster,
                                                                              reference):
    """A chat stream with a long prompt goes (by its prefix) to a known replica, which is
    killed during the prefill: the client sees nothing of it, and gets the whole answer
    from the other replica."""
    from peregrine import SamplingParams
    _wait_for_replicas(2)
    system = "Background for the question that follows. " + SYSTEM * 9
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "Summarize the rules in one sentence."}]
    expected = reference.chat(messages, SamplingParams(temperature=0, max_tokens=32))
    # The route follows the first 256 characters; the engine caches only those tokens, so
    # the stream's prefill below is long.
    holder = httpx.post(cluster + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "system", "content": system[:256]}], "max_tokens": 1}
    ).headers[REPLICA_HEADER.decode()]
    retried = parse_metrics(httpx.get(cluster + "/metrics", timeout=60).text).get(
        "peregrine:ray_requests_retried_total", 0)
    body = {"messages": messages, "max_tokens": 32, "temperature": 0, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def stream() -> tuple[str, list[str]]:
            with httpx.stream("POST", cluster + "/v1/chat/completions", json=body,
                              timeout=300) as r:
                return r.headers[REPLICA_HEADER.decode()], [x for x in r.iter_lines() if x]
        future = pool.submit(stream)
        time.sleep(0.3)  # routed to the holder, whose prefill takes far longer than this
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{REPLICA}#{holder}",
                               namespace="serve"), no_restart=True)
        replica, lines = future.result(timeout=300)
    assert replica != holder
    events = [json.loads(line[6:]) for line in lines
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert lines[-1] == "data: [DONE]" and not any("error" in e for e in events)
    assert [e["choices"][0]["delta"].get("role") for e in events].count("assistant") == 1
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) \
        == expected[0].outputs[0].text
    m = parse_metrics(httpx.get(cluster + "/metrics", timeout=60).text)
    assert m["peregrine:ray_requests_retried_total"] > retried


def test_a_replica_killed_mid_run_loses_no_request(cluster, reference):
    """Concurrent non-streamed requests; the replica that answered a first request is
    killed while they run (the other may still be the replacement for the one the test
    before killed, starting): every request completes with the single engine's greedy
    answer."""
    from peregrine import SamplingParams
    prompts = [f"Fact number {i} about the ocean:" for i in range(8)]
    expected = [o.outputs[0].text for o in
                reference.generate(prompts, SamplingParams(temperature=0, max_tokens=48))]
    served: Counter[str] = Counter()

    def complete(prompt: str) -> str:
        r = httpx.post(cluster + "/v1/completions", timeout=180, json={
            "prompt": prompt, "max_tokens": 48, "temperature": 0})
        assert r.status_code == 200, r.text
        served[r.headers[REPLICA_HEADER.decode()]] += 1
        return r.json()["choices"][0]["text"]

    victim = httpx.post(cluster + "/v1/completions", timeout=60, json={
        "prompt": "warm up", "max_tokens": 1}).headers[REPLICA_HEADER.decode()]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, p) for p in prompts]
        time.sleep(1.5)  # the requests are in flight on both replicas
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{REPLICA}#{victim}",
                               namespace="serve"), no_restart=True)
        answers = [f.result(timeout=300) for f in futures]
    assert answers == expected
    assert victim not in served or served[victim] < len(prompts)
    m = parse_metrics(httpx.get(cluster + "/metrics", timeout=60).text)
    assert m["peregrine:ray_requests_retried_total"] >= 1


def test_a_stream_whose_replica_dies_after_its_first_token_ends_with_an_error(cluster):
    """Past its first token a stream cannot be replayed elsewhere: it ends with an error
    event (which OpenAI's client raises) and [DONE], not with a hang or a silent cut."""
    body = {"prompt": "Once upon a time, a lighthouse keeper", "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=180) as r:
        assert r.status_code == 200
        replica = r.headers[REPLICA_HEADER.decode()]
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{REPLICA}#{replica}",
                               namespace="serve"), no_restart=True)
        rest = [line for line in lines if line.startswith("data: ")]
    assert len(rest) >= 2 and rest[-1] == "data: [DONE]", (first, rest)
    assert '"code": "replica_died"' in rest[-2], (first, rest)


@pytest.mark.slow
def test_replicas_scale_up_with_the_queue_and_back_down(cluster):
    """1..2 replicas aiming at one request in flight each: a burst of concurrent requests
    makes the autoscaler add a second replica, and once they are done it goes again.
    Replaces the module's application (run it last)."""
    serve.delete(APP_NAME)
    serve.run(build(ServerArgs(), EngineConfig(**ENGINE),
                    RayArgs(min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                            upscale_delay_s=1, downscale_delay_s=10, replica_cpus=1)),
              name="autoscale", route_prefix="/")
    assert _replicas("autoscale") == 1

    def complete(i: int) -> int:
        r = httpx.post(cluster + "/v1/completions", timeout=600, json={
            "prompt": f"Story {i}: the storm", "max_tokens": 384, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    peak = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, i) for i in range(8)]
        while not all(f.done() for f in futures):
            peak = max(peak, _replicas("autoscale"))
            time.sleep(0.5)
        assert [f.result() for f in futures] == [384] * 8
    assert peak == 2  # started (a burst may end before the new replica has loaded)
    deadline = time.monotonic() + 180
    while _replicas("autoscale") > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert _replicas("autoscale") == 1
