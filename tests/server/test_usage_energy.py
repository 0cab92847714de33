"""usage.energy / usage.cost_usd (only when asked) and the energy counters of /metrics, on a
server whose meter is a fake that gains one joule per token a step computes."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest

from peregrine.config import EngineConfig
from peregrine.energy import EnergyAccountant, FakePowerMeter
from peregrine.server.app import ServerArgs
from tests.server.conftest import SMALL_KV, serve

OPENAI_USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens",
                     "prompt_tokens_details", "truncation"}
PRICE = 36.0  # $/hour: every 0.25 s step costs $0.0025


@pytest.fixture(scope="module")
def metered():
    with serve(ServerArgs(), EngineConfig(**SMALL_KV, price_per_hour=PRICE)) as s:
        engine = s.engine.wait_ready()
        meter = FakePowerMeter()
        clock = itertools.count(0.0, 0.25)
        engine.energy = EnergyAccountant(meter, PRICE, clock=lambda: next(clock))
        engine.batch_observer = lambda batch: meter.add(float(batch.num_tokens))
        yield s, meter


def _complete(s, **body) -> dict:
    return httpx.post(s.url + "/v1/completions", timeout=120, json={
        "max_tokens": 4, "temperature": 0, "ignore_eos": True, **body}).json()


def test_usage_has_energy_only_when_asked(metered):
    s, meter = metered
    plain = _complete(s, prompt="The energy of one request is")
    assert set(plain["usage"]) == OPENAI_USAGE_KEYS
    before = meter.total
    r = _complete(s, prompt="What does one request cost? It", usage_detail=True)
    u = r["usage"]
    assert set(u) == OPENAI_USAGE_KEYS | {"energy", "cost_usd"}
    assert u["completion_tokens"] == 4 and u["total_tokens"] == u["prompt_tokens"] + 4
    # one joule per computed token: the uncached prompt and every output token but the last
    computed = u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] + 3
    assert u["energy"] == {"joules": pytest.approx(computed), "source": "model"}
    assert meter.total - before == pytest.approx(computed)
    steps = 4  # alone on the server: one prefill step (short prompt), three decodes
    assert u["cost_usd"] == pytest.approx(steps * 0.25 * PRICE / 3600)


def test_chat_stream_usage_chunk_carries_energy(metered):
    s, _ = metered
    body = {"messages": [{"role": "user", "content": "Say something about watts."}],
            "max_tokens": 3, "temperature": 0, "stream": True, "usage_detail": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["energy"]["source"] == "model" and usage["energy"]["joules"] > 0
    assert usage["cost_usd"] > 0
    chunks = [json.loads(e) for e in events[:-2]]
    assert all("usage" not in c for c in chunks)
    plain = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
        **body, "stream": False, "usage_detail": False}).json()
    assert set(plain["usage"]) == OPENAI_USAGE_KEYS


def test_energy_counters_move(metered):
    s, meter = metered
    before, j0 = s.metrics(), meter.total
    _complete(s, prompt="Counting joules: one, two,")
    after = s.wait_idle()
    assert after["peregrine:energy_source_info{source=\"model\"}"] == 1
    delta = after["peregrine:energy_joules_total"] - before["peregrine:energy_joules_total"]
    assert delta == pytest.approx(meter.total - j0) and delta > 0
    cost = after["peregrine:cost_usd_total"] - before["peregrine:cost_usd_total"]
    assert cost == pytest.approx(4 * 0.25 * PRICE / 3600)
    assert after["peregrine:tokens_per_kwh"] > 0 and after["peregrine:tokens_per_usd"] > 0


def test_usage_energy_flag_puts_it_in_every_response():
    args = ServerArgs(usage_energy=True, embedding_model=None)
    with serve(args, EngineConfig(**SMALL_KV)) as s:
        u = _complete(s, prompt="Always metered")["usage"]
    assert u["energy"]["joules"] >= 0 and u["energy"]["source"] in ("model", "rapl")
    assert "cost_usd" not in u  # no --price-per-hour: cost is unknown, not zero
