"""Energy figures of bench reports: the arithmetic, and a tiny throughput run's report."""

from __future__ import annotations

import pytest

from peregrine.bench.datasets import random_requests
from peregrine.bench.energy import energy_figures
from peregrine.bench.report import render
from peregrine.bench.results import suite
from peregrine.bench.roofline import DevicePeak
from peregrine.bench.throughput import run_batchings
from peregrine.config import EngineConfig
from peregrine.models.loader import load_tokenizer

PEAK = DevicePeak("test", flops=1e11, bandwidth=1e10, source="test")


def test_energy_figures_by_hand():
    # 720 J over 60 s for 1,000 output tokens of 4,000 in all, a $1.80/hour device
    f = energy_figures(720.0, "model", "model: test", 1000, 4000, 60.0, 1.8)
    assert f["mean_watts"] == 12.0
    assert f["joules_per_output_token"] == 0.72 and f["joules_per_token"] == 0.18
    assert f["output_tokens_per_kwh"] == pytest.approx(1000 / (720 / 3.6e6))  # 5,000,000
    assert f["tokens_per_kwh"] == pytest.approx(2e7)
    # 60 s of $1.80/hour = $0.03 for 1,000 tokens = $30 per million
    assert f["usd_per_mtok_output"] == pytest.approx(30.0)
    assert energy_figures(1.0, "rapl", "x", 10, 20, 1.0)["usd_per_mtok_output"] is None


def test_throughput_report_carries_energy(tiny_model_dir):
    tok = load_tokenizer(None)
    tok.vocab_size = 512
    requests = random_requests(4, (8, 30), (2, 6), tok, seed=1)
    base = dict(load_format="dummy", num_kv_blocks=256, block_size=4, max_num_seqs=2)
    cfg = EngineConfig(tiny_model_dir, **base, power_source="model", power_watts=10.0,
                       price_per_hour=3.6)
    run = run_batchings(requests, cfg, ["continuous"], PEAK)[0]
    e = run["energy"]
    assert e["source"] == "model" and "10 W per busy core" in e["description"]
    assert e["joules"] > 0
    assert e["joules_per_output_token"] == pytest.approx(e["joules"] / run["output_tokens"])
    assert e["usd_per_mtok_output"] == pytest.approx(
        3.6 * run["wall_s"] / 3600 / run["output_tokens"] * 1e6)
    md = render(suite("throughput", [run], peak=PEAK.to_dict()))
    assert "Energy and cost" in md and "J / output token" in md
    assert "Power: model: process CPU time x 10 W per busy core (--power-watts)." in md
    off = run_batchings(requests, EngineConfig(tiny_model_dir, **base, power_source="off"),
                        ["continuous"], PEAK)[0]
    assert "energy" not in off
    assert "Energy" not in render(suite("throughput", [off], peak=PEAK.to_dict()))
