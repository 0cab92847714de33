"""`peregrine estimate --compare-api`: the arithmetic, checked by hand."""

from __future__ import annotations

import json

import pytest

from peregrine.cli import main
from peregrine.estimate.compare import (break_even_tok_s, compare_api, output_capacity,
                                        usd_per_mtok)


def test_hand_checked_break_even():
    # $2/hour, API $10 per million output tokens, 200 output tokens a request:
    # break-even T* = 2 x 1e6 / (3600 x 10) = 55.555... tok/s
    #   = 55.555 x 86400 / 200 = 24,000 requests/day;
    # at a capacity of 1000 tok/s, full load costs 2 / (1000 x 3600) x 1e6 = $0.5556/Mtok,
    # and 1% of capacity (10 tok/s) costs 2 / 36000 x 1e6 = $55.56/Mtok: the API is cheaper.
    c = compare_api(10.0, 2.0, 1000.0, 200, "given", levels=(0.01, 1.0))
    assert c["break_even_output_tok_s"] == pytest.approx(55.556, abs=1e-3)
    assert c["break_even_requests_per_day"] == pytest.approx(24000.0)
    assert c["full_load_usd_per_mtok"] == pytest.approx(0.5556)
    assert c["self_hosting_can_win"]
    rows = {r["traffic"]: r for r in c["rows"]}
    assert [r["traffic"] for r in c["rows"]] == ["1% of capacity", "break-even",
                                                   "100% of capacity"]
    assert rows["1% of capacity"]["self_hosted_usd_per_mtok"] == pytest.approx(55.5556)
    assert rows["1% of capacity"]["requests_per_day"] == pytest.approx(4320.0)
    assert rows["1% of capacity"]["cheaper"] == "api"
    assert rows["break-even"]["self_hosted_usd_per_mtok"] == pytest.approx(10.0)
    assert rows["break-even"]["cheaper"] == "same"
    assert rows["100% of capacity"]["cheaper"] == "self-hosted"


def test_a_device_too_slow_never_wins():
    # $1/hour at 20 tok/s: $13.89/Mtok at full load, break-even 27.8 tok/s > capacity
    c = compare_api(10.0, 1.0, 20.0, 100, "given")
    assert not c["self_hosting_can_win"]
    assert c["full_load_usd_per_mtok"] == pytest.approx(13.8889)
    assert all(r["cheaper"] == "api" for r in c["rows"])
    assert "break-even" not in [r["traffic"] for r in c["rows"]]


def test_helpers_and_errors():
    assert usd_per_mtok(3.6, 1000) == pytest.approx(1.0)
    assert break_even_tok_s(3.6, 1.0) == pytest.approx(1000.0)
    # 100 output tok/s decode, 1000 tok/s prefill, 500-token prompt per 100 output tokens:
    # each output token costs 1/100 + 5/1000 s = 0.015 s -> 66.67 tok/s
    assert output_capacity(100.0, 1000.0, 500, 100) == pytest.approx(66.667, abs=1e-3)
    with pytest.raises(ValueError, match="price-per-hour"):
        compare_api(10.0, 0.0, 100.0, 10, "given")
    with pytest.raises(ValueError):
        compare_api(0.0, 1.0, 100.0, 10, "given")


def test_cli_json_and_table(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--max-model-len", "2048",
                 "--devices", "L4,H100", "--prompt-len", "512", "--output-len", "256",
                 "--price-per-hour", "2.5", "--compare-api", "10", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    by_name = {d["name"]: d for d in r["devices"]}
    for c in r["compare_api"]:
        count, name = c["device"].split(" x ")
        d = by_name[name]
        cap = output_capacity(d["decode_tok_s"], d["prefill_tok_s"], 512, 256)
        assert c["capacity_output_tok_s"] == pytest.approx(cap, abs=1e-3)
        assert c["price_per_hour"] == pytest.approx(2.5 * int(count))
        assert c["break_even_output_tok_s"] == pytest.approx(
            2.5 * int(count) * 1e6 / 36000, abs=1e-3)
    assert main(["estimate", "--model", "llama-2-7b", "--max-model-len", "2048",
                 "--devices", "H100", "--output-len", "100", "--price-per-hour", "4",
                 "--compare-api", "2", "--measured-tok-s", "500"]) == 0
    out = capsys.readouterr().out
    # 4 x 1e6 / (3600 x 2) = 555.56 tok/s > 500 measured: the API stays cheaper
    assert "measured: $4/hour, capacity 500.0 output tok/s" in out
    assert "555.56 output tok/s" in out and "beyond this device's capacity" in out
    assert main(["estimate", "--model", "llama-2-7b", "--compare-api", "10"]) == 2
    assert "price-per-hour" in capsys.readouterr().err
