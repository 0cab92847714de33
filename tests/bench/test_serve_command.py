"""`peregrine bench serve` end to end: against a running endpoint, and launching our own
server and llama-cpp-python's (each when it is installed; llama.cpp's own llama-server:
test_llamacpp_bin.py)."""

from __future__ import annotations

import json

import pytest

from peregrine.bench.launch import module_available, unavailable_reason
from peregrine.cli import main

SMALL = ["--num-prompts", "3", "--input-len", "8-16", "--output-len", "3-5", "--seed", "1"]


def check_points(data: dict, server: str, concurrencies: list[int]) -> None:
    w = data["workload"]
    runs = [r for r in data["runs"] if r["server"] == server]
    assert [r["max_concurrency"] for r in runs] == concurrencies
    for r in runs:
        assert not r.get("error") and (r["completed"], r["failed"]) == (3, 0)
        assert r["output_tokens"] == w["output_tokens"]  # every request ran to its length
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(r[key]) == {"mean", "median", "p90", "p99", "min", "max"}
        assert r["ttft_ms"]["median"] <= r["e2el_ms"]["median"]
        assert len(r["per_request"]["ttft_ms"]) == 3
        assert r["goodput"]["good_requests"] == 3  # the SLOs are generous
        assert r["output_throughput"] == pytest.approx(r["output_tokens"] / r["duration_s"])


def test_serve_command_sweeps_concurrency_against_an_endpoint(fake_server, tmp_path):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", fake_server, *SMALL, "--max-concurrency",
                 "1,2", "--goodput", "ttft:60000", "tpot:60000", "--output", str(out),
                 "--markdown", str(tmp_path / "serve.md")]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "serve" and data["endpoint"] == "/v1/completions"
    check_points(data, "server", [1, 2])
    assert data["runs"][0]["output_tokens_from"] == ["usage"]
    assert data["runs"][0]["model"] == "fake-model"  # discovered from /v1/models
    assert "| server | - | 1 concurrent, all at once | 3/3 |" in (tmp_path / "serve.md").read_text()
    assert main(["bench", "plot", str(out), "--out-dir", str(tmp_path / "img")]) == 0
    for name in ("serve_vs_load.png", "serve_throughput_latency.png", "serve_latency_cdf.png"):
        assert (tmp_path / "img" / name).read_bytes()[:4] == b"\x89PNG"


def test_each_sweep_point_can_send_its_own_number_of_requests(fake_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", fake_server, "--input-len", "8",
                 "--output-len", "2", "--max-concurrency", "1,4", "--num-prompts", "2,5",
                 "--output", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["num_prompts"], r["completed"]) for r in runs] == [(2, 2), (5, 5)]
    assert main(["bench", "serve", "--base-url", fake_server, "--max-concurrency", "1,4",
                 "--num-prompts", "2,5,7"]) == 2
    assert "--num-prompts has 3 values for 2 sweep points" in capsys.readouterr().err


def test_a_request_rate_sweep_is_plotted(fake_server, tmp_path):
    out = tmp_path / "rates.json"
    assert main(["bench", "serve", "--base-url", fake_server, "--input-len", "8",
                 "--output-len", "2", "--num-prompts", "4", "--request-rate", "200,inf",
                 "--output", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [200.0, "inf"]
    assert main(["bench", "plot", str(out), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "rates_vs_load.png").exists()


def test_serve_needs_exactly_one_target(capsys):
    assert main(["bench", "serve", *SMALL]) == 2
    assert "exactly one of --base-url" in capsys.readouterr().err


@pytest.mark.skipif(not module_available("peregrine.server.app"),
                    reason="peregrine.server.app is not importable yet (the OpenAI server is "
                           "built on another branch); this runs `peregrine serve` once merged")
def test_serve_command_launches_peregrine_serve(tmp_path):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--launch", "peregrine", *SMALL, "--max-concurrency", "1,3",
                 "--goodput", "ttft:600000", "--server-args", "--kv-cache-memory 0.25",
                 "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    check_points(data, "peregrine", [1, 3])
    assert data["runs"][0]["output_tokens_from"] == ["usage"]
    assert (tmp_path / "server-peregrine.log").exists()


@pytest.mark.skipif(unavailable_reason("llama.cpp-python") is not None,
                    reason="llama-cpp-python[server] is not installed (optional extra `peers`)")
def test_serve_command_launches_llamacpp_python_server(tmp_path):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--launch", "llama.cpp-python", *SMALL, "--max-concurrency",
                 "2", "--goodput", "ttft:600000", "--threads", "1", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    check_points(data, "llama.cpp-python", [2])
    # llama-cpp-python sends no usage while streaming; "length" gives the exact count.
    assert data["runs"][0]["output_tokens_from"] == ["length"]
