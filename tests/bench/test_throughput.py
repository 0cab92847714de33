"""Offline throughput of our engine and of the peers, at a tiny size (plumbing, no timing)."""

from __future__ import annotations

import pytest

from peregrine.bench.datasets import random_requests
from peregrine.bench.launch import module_available
from peregrine.bench.roofline import DevicePeak
from peregrine.bench.throughput import run_batchings
from peregrine.config import EngineConfig
from peregrine.models.loader import load_tokenizer

PEAK = DevicePeak("test", flops=1e11, bandwidth=1e10, source="test")
RUN_KEYS = {"engine", "label", "settings", "num_requests", "prompt_tokens", "output_tokens",
            "total_tokens", "generated_tokens", "wall_s", "requests_per_s",
            "output_tokens_per_s", "total_tokens_per_s", "prefill", "decode", "steps",
            "cost_model"}
PHASE_KEYS = {"tokens", "seconds", "steps", "tokens_per_s", "tflops_per_s", "gbytes_per_s",
              "mfu", "mbu"}


@pytest.fixture(scope="module")
def tiny_requests():
    tok = load_tokenizer(None)
    tok.vocab_size = 512  # the tiny model's vocabulary
    return random_requests(5, (8, 40), (2, 9), tok, seed=3)


def check_run(run: dict, requests: list) -> None:
    """What every throughput run must satisfy, whatever engine made it."""
    assert RUN_KEYS <= set(run)
    assert PHASE_KEYS <= set(run["prefill"]) and PHASE_KEYS <= set(run["decode"])
    assert run["num_requests"] == len(requests)
    assert run["prompt_tokens"] == sum(r.prompt_len for r in requests)
    assert run["output_tokens"] == sum(r.output_len for r in requests)
    assert run["total_tokens"] == run["prompt_tokens"] + run["output_tokens"]
    assert run["generated_tokens"] >= run["output_tokens"]
    assert run["wall_s"] > 0
    assert run["total_tokens_per_s"] == pytest.approx(run["total_tokens"] / run["wall_s"])
    assert run["prefill"]["seconds"] + run["decode"]["seconds"] <= run["wall_s"]
    assert 0 < run["prefill"]["mfu"] and 0 < run["decode"]["mbu"]


def test_continuous_static_and_dynamic_batching(tiny_model_dir, tiny_requests):
    cfg = EngineConfig(tiny_model_dir, load_format="dummy", num_kv_blocks=256, block_size=4,
                       max_num_seqs=2, max_num_batched_tokens=32)
    runs = run_batchings(tiny_requests, cfg, ["continuous", "static", "dynamic"], PEAK)
    assert [r["settings"]["batching"] for r in runs] == ["continuous", "static", "dynamic"]
    for run in runs:
        check_run(run, tiny_requests)
        assert run["generated_tokens"] == run["output_tokens"]  # no wasted tokens
        assert run["prefill"]["tokens"] == run["prompt_tokens"]
        assert run["decode"]["tokens"] == run["output_tokens"] - run["num_requests"]
    assert runs[0]["steps"]["mixed"] > 0  # continuous: prefills share steps with decodes


def test_transformers_peer(tiny_model_dir, tiny_requests):
    pytest.importorskip("transformers")
    from peregrine.bench.peers.hf_transformers import run_transformers
    run = run_transformers(tiny_requests, PEAK, model=tiny_model_dir, load_format="dummy",
                           batch_size=2)
    check_run(run, tiny_requests)
    batches = [tiny_requests[i:i + 2] for i in range(0, len(tiny_requests), 2)]
    # Every member of a static batch runs to the batch's longest output.
    assert run["generated_tokens"] == sum(len(b) * max(r.output_len for r in b) for b in batches)
    assert run["prefill"]["tokens"] == run["prompt_tokens"]
    assert run["decode"]["tokens"] == run["generated_tokens"] - run["num_requests"]
    assert run["steps"]["mixed"] == 0


@pytest.mark.skipif(not module_available("llama_cpp"), reason="llama-cpp-python is not "
                    "installed (optional extra `peers`)")
def test_llamacpp_peer_on_the_same_gguf():
    from peregrine.bench.peers.llamacpp import run_llamacpp
    tok = load_tokenizer(None)
    requests = random_requests(2, (8, 24), (2, 5), tok, seed=1)
    run = run_llamacpp(requests, PEAK, model=None, threads=1)
    check_run(run, requests)
    assert run["decode"]["tokens"] == run["output_tokens"] - 2
    assert run["cost_model"]["weight_bytes_per_forward"] < 135e6  # Q4_1: under a byte each
