"""GET /metrics: Prometheus text with request histograms, engine gauges and token counters."""

from __future__ import annotations

import httpx

from tests.server.conftest import parse_metrics

HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
              "request_time_per_output_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens",
              "request_generation_tokens"]
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage", "kv_cache_blocks",
          "prefix_cache_hit_rate"]
COUNTERS = ["prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
            "prompt_tokens_total", "generation_tokens_total", "engine_steps_total"]


def test_every_metric_is_exposed_in_prometheus_format(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in HISTOGRAMS:
        assert f"# TYPE peregrine:{name} histogram" in text
        assert f'peregrine:{name}_bucket{{le="+Inf",model_name="smollm2-135m"}}' in text
    for name in GAUGES:
        assert f"# TYPE peregrine:{name} gauge" in text
    for name in COUNTERS:
        assert f"# TYPE peregrine:{name} counter" in text
    assert "# TYPE peregrine:request_success_total counter" in text
    assert "_created" not in text
    m = parse_metrics(text)
    assert 0 <= m["peregrine:kv_cache_usage"] <= 1 and m["peregrine:kv_cache_blocks"] > 0


def test_a_request_moves_every_counter_and_histogram(server):
    before = server.metrics()
    n_out = 6
    r = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": "Counting: one, two, three,", "max_tokens": n_out, "temperature": 0,
        "ignore_eos": True}).json()
    n_prompt = r["usage"]["prompt_tokens"]
    after = server.wait_idle()

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('peregrine:request_success_total{finished_reason="length"}') == 1
    assert delta("peregrine:generation_tokens_total") == n_out
    assert delta("peregrine:prompt_tokens_total") == n_prompt - r["usage"][
        "prompt_tokens_details"]["cached_tokens"]
    for name in ["time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_time_per_output_token_seconds",
                 "request_prompt_tokens", "request_generation_tokens"]:
        assert delta(f"peregrine:{name}_count") == 1, name
    assert delta("peregrine:request_prompt_tokens_sum") == n_prompt
    assert delta("peregrine:request_generation_tokens_sum") == n_out
    # One inter-token gap per step after the first token (alone, one token per step).
    assert delta("peregrine:inter_token_latency_seconds_count") == n_out - 1
    assert delta("peregrine:e2e_request_latency_seconds_sum") >= delta(
        "peregrine:time_to_first_token_seconds_sum") > 0
    assert after["peregrine:kv_cache_usage"] == 0


def test_stop_and_prefix_cache_hits_are_counted(server):
    prompt = "A long shared preamble about the history of the city of Lyon, " * 4
    stop = 'peregrine:request_success_total{finished_reason="stop"}'
    before = server.metrics()
    reasons = [httpx.post(server.url + "/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": [" ", "\n"]}
        ).json()["choices"][0]["finish_reason"] for _ in range(2)]
    after = server.wait_idle()
    assert reasons == ["stop", "stop"]
    assert after[stop] - before.get(stop, 0) == 2
    hits = after["peregrine:prefix_cache_hits_total"] - before["peregrine:prefix_cache_hits_total"]
    assert hits >= 16  # the second request found at least one full block of the first
    assert 0 < after["peregrine:prefix_cache_hit_rate"] <= 1
