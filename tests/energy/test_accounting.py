"""Attribution: each step's meter delta and time split among its requests by tokens."""

from __future__ import annotations

import itertools

import pytest

from peregrine.energy import EnergyAccountant, FakePowerMeter, split
from peregrine.sampling_params import SamplingParams
from tests.conftest import make_tiny_llm


def test_split_is_proportional_and_sums_to_the_total():
    assert split(8.0, [10, 30]) == [2.0, 6.0]
    assert split(3.0, [0, 0, 0]) == [1.0, 1.0, 1.0]
    assert split(1.0, []) == []
    parts = split(0.7, [3, 5, 11])
    assert sum(parts) == pytest.approx(0.7)


def test_accountant_charges_joules_time_and_cost_per_step():
    meter = FakePowerMeter()
    clock = itertools.count(0.0, 0.5)  # every step lasts 0.5 s
    acc = EnergyAccountant(meter, price_per_hour=36.0, clock=lambda: next(clock))
    acc.start_step()
    meter.add(12.0)
    shares = acc.end_step([1, 3])
    assert [s.joules for s in shares] == [3.0, 9.0]
    assert [s.seconds for s in shares] == [0.125, 0.375]
    # 0.5 s of a $36/h device is $0.005, split 1:3
    assert [s.cost_usd for s in shares] == pytest.approx([0.00125, 0.00375])
    assert acc.joules_total == 12.0 and acc.tokens_total == 4
    assert acc.tokens_per_kwh == pytest.approx(4 / (12 / 3.6e6))
    assert acc.tokens_per_usd == pytest.approx(4 / 0.005)
    meter.add(100.0)  # energy outside a step is charged to no one
    assert [s.joules for s in acc.end_step([5])] == [0.0]
    assert acc.joules_total == 12.0
    with pytest.raises(ValueError):
        EnergyAccountant(meter, price_per_hour=-1)


def _metered_llm(model_dir: str, **kwargs):
    """A tiny engine whose meter gains 2 J + 0.25 J per token at every step, with each
    step's expected split recorded independently of the engine's own attribution."""
    llm = make_tiny_llm(model_dir, **kwargs)
    engine = llm.engine
    meter = FakePowerMeter()
    clock = itertools.count(0.0, 0.1)
    engine.energy = EnergyAccountant(meter, price_per_hour=3.6, clock=lambda: next(clock))
    expected: dict[str, float] = {}

    def observe(batch) -> None:
        joules = 2.0 + 0.25 * batch.num_tokens
        meter.add(joules)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            rid = seq.request.request_id
            expected[rid] = expected.get(rid, 0.0) + joules * n / batch.num_tokens

    engine.batch_observer = observe
    return llm, meter, expected


def test_two_requests_in_one_step_split_its_energy_by_tokens(tiny_model_dir):
    llm, meter, _ = _metered_llm(tiny_model_dir)
    engine = llm.engine
    p = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request("short", [5] * 10, p)
    engine.add_request("long", [6] * 30, p)
    outs = {o.request_id: o for o in engine.step()}
    assert not engine.has_unfinished_requests()  # both prefilled and sampled in one step
    # the step: 2 + 0.25 x 40 = 12 J over 10 + 30 tokens; 0.1 s at $3.60/h = $0.0001
    assert meter.total == 12.0
    assert outs["short"].metrics.energy_joules == pytest.approx(3.0)
    assert outs["long"].metrics.energy_joules == pytest.approx(9.0)
    assert outs["short"].metrics.cost_usd == pytest.approx(0.000025)
    assert outs["long"].metrics.cost_usd == pytest.approx(0.000075)
    assert outs["long"].metrics.energy_source == "model"


def test_attribution_over_many_steps_sums_to_the_meter(tiny_model_dir):
    # a small token budget: prompts are prefilled in chunks alongside other requests' decodes
    llm, meter, expected = _metered_llm(tiny_model_dir, max_num_batched_tokens=24)
    engine = llm.engine
    for i, (n_prompt, n_out) in enumerate([(40, 7), (9, 12), (17, 3), (3, 9)]):
        engine.add_request(f"r{i}", [7 + i] * n_prompt,
                           SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True))
    final = {}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        for out in engine.step():
            final[out.request_id] = out
    assert steps > 5
    got = {rid: o.metrics.energy_joules for rid, o in final.items()}
    assert got == pytest.approx(expected)
    assert sum(got.values()) == pytest.approx(meter.total)
    stats = engine.get_stats()
    assert stats.energy_joules_total == pytest.approx(meter.total)
    assert stats.energy_source == "model"
    assert stats.cost_usd_total == pytest.approx(steps * 0.1 * 3.6 / 3600)
    assert sum(o.metrics.cost_usd for o in final.values()) == pytest.approx(
        stats.cost_usd_total)
    tokens = 40 + 9 + 17 + 3 + 7 + 12 + 3 + 9 - 4  # each last token is sampled, not computed
    assert stats.tokens_per_kwh == pytest.approx(tokens / (meter.total / 3.6e6))


def test_power_source_off_and_no_price_report_nothing(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, power_source="off")
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0]
    assert out.metrics.energy_joules is None and out.metrics.cost_usd is None
    assert llm.engine.get_stats().energy_source is None
    llm = make_tiny_llm(tiny_model_dir)  # this machine's default meter, no price
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0]
    assert out.metrics.energy_joules >= 0 and out.metrics.cost_usd is None
    assert out.metrics.energy_source in ("rapl", "model")
