"""Attributing step time to prefill and decode."""

from __future__ import annotations

import pytest

from peregrine.bench.phases import EngineStepTimer, PhaseAccounting, StepWork
from peregrine.bench.roofline import DevicePeak
from peregrine.bench.throughput import bench_params, engine_cost
from tests.conftest import make_tiny_llm

PEAK = DevicePeak("test", flops=1e12, bandwidth=1e11, source="test")


def test_a_pure_step_goes_wholly_to_its_phase():
    acc = PhaseAccounting(weight_bytes=1000.0)
    acc.add(2.0, StepWork(prefill_tokens=10, prefill_flops=100.0, prefill_kv_bytes=50.0))
    acc.add(1.0, StepWork(decode_tokens=4, decode_flops=8.0, decode_kv_bytes=20.0))
    assert (acc.prefill.seconds, acc.decode.seconds) == (2.0, 1.0)
    assert acc.prefill.bytes == 1050.0 and acc.decode.bytes == 1020.0
    assert acc.mixed_steps == 0


def test_a_mixed_step_is_split_in_proportion_to_flops():
    acc = PhaseAccounting(weight_bytes=100.0)
    acc.add(1.0, StepWork(prefill_tokens=30, decode_tokens=2, prefill_flops=75.0,
                          decode_flops=25.0, prefill_kv_bytes=7.0, decode_kv_bytes=3.0))
    assert acc.prefill.seconds == pytest.approx(0.75)
    assert acc.decode.seconds == pytest.approx(0.25)
    assert acc.prefill.bytes == pytest.approx(75.0 + 7.0)
    assert acc.decode.bytes == pytest.approx(25.0 + 3.0)
    assert (acc.prefill.tokens, acc.decode.tokens) == (30, 2)
    summary = acc.summary(PEAK)
    assert summary["steps"]["mixed"] == 1 and summary["steps"]["mixed_time_fraction"] == 1.0
    assert summary["prefill"]["tokens_per_s"] == pytest.approx(40.0)
    assert summary["decode"]["mfu"] == pytest.approx(25.0 / 0.25 / 1e12)


def test_engine_steps_account_every_prompt_and_decode_token(tiny_model_dir):
    llm = make_tiny_llm(tiny_model_dir, max_num_batched_tokens=16, enable_prefix_caching=False)
    engine = llm.engine
    timer = EngineStepTimer(engine, engine_cost(engine))
    prompts = [[3 + i] * n for i, n in enumerate((5, 23, 40))]  # 40 > budget: chunked
    outs = [4, 1, 6]
    ids = [engine.add_request(None, {"prompt_token_ids": p}, bench_params(o)).request_id
           for p, o in zip(prompts, outs)]
    final = timer.run_until_done()
    timer.close()
    assert engine.batch_observer is None
    assert [len(final[i].outputs[0].token_ids) for i in ids] == outs
    acc = timer.phases
    assert acc.prefill.tokens == sum(len(p) for p in prompts)
    # The first token of each request comes from its last prefill step.
    assert acc.decode.tokens == sum(o - 1 for o in outs)
    assert acc.num_steps == len(timer.step_log) == engine.num_steps
    assert acc.mixed_steps >= 1  # the chunked 40-token prompt shares steps with decodes
    total = sum(s for s, _ in timer.step_log)
    assert acc.prefill.seconds + acc.decode.seconds == pytest.approx(total)


def test_speculative_drafts_count_as_decode_work(tiny_model_dir):
    """Verified draft positions are decode work (computed, accepted or not), never prefill."""
    llm = make_tiny_llm(tiny_model_dir, speculative="ngram", enable_prefix_caching=False)
    engine = llm.engine
    timer = EngineStepTimer(engine, engine_cost(engine))
    prompt = [5, 6, 7, 8] * 6
    engine.add_request(None, {"prompt_token_ids": prompt}, bench_params(20))
    timer.run_until_done()
    timer.close()
    stats = engine.get_stats().spec_decode
    assert stats.num_draft_tokens > 0
    assert timer.phases.prefill.tokens == len(prompt)
    # Each decode step computes its last token plus the drafts it verifies.
    assert timer.phases.decode.tokens == (timer.phases.num_steps - 1) + stats.num_draft_tokens
