"""AsyncLLMEngine: the engine on its own thread, driven from asyncio."""

from __future__ import annotations

import asyncio

import pytest

from peregrine.config import EngineConfig
from peregrine.engine.async_engine import (AsyncLLMEngine, EngineNotReadyError,
                                           RequestFailedError)
from peregrine.engine.llm_engine import LLMEngine
from peregrine.sampling_params import SamplingParams
from tests.conftest import make_tiny_llm

PROMPTS = [[1 + i, 7, 9 + 3 * i, 4] * (1 + i % 3) for i in range(8)]


def tiny_config(model_dir: str, **kw) -> EngineConfig:
    return EngineConfig(model=model_dir, **{**dict(load_format="dummy", dtype="float64",
                                                   num_kv_blocks=256, block_size=4), **kw})


def one_fails_then_one_succeeds(engine: AsyncLLMEngine, failing_id: str, error: str,
                                next_prompt: list[int]) -> None:
    """Request `failing_id` (PROMPTS[0]) ends in a RequestFailedError matching `error`,
    holding no KV block afterwards, and a fresh request then runs to its end."""
    async def main():
        params = SamplingParams(temperature=0, max_tokens=5)
        doomed = await engine.add_request(failing_id, {"prompt_token_ids": PROMPTS[0]}, params)
        with pytest.raises(RequestFailedError, match=error):
            await _final(doomed)
        fine = await engine.add_request(failing_id + "-next",
                                        {"prompt_token_ids": next_prompt}, params)
        return await _final(fine)

    outs = asyncio.run(main())
    assert len(outs[-1].outputs[0].token_ids) == 5
    assert engine.stats().kv_cache_usage == 0


@pytest.fixture
def engine(tiny_model_dir):
    eng = AsyncLLMEngine(tiny_config(tiny_model_dir))
    eng.start()
    eng.wait_ready(120)
    yield eng
    eng.shutdown()


async def _final(stream):
    outs = [out async for out in stream]
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return outs


def test_outputs_equal_the_offline_engine(engine, tiny_model_dir):
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [o.outputs[0].token_ids for o in make_tiny_llm(tiny_model_dir).generate(
        [{"prompt_token_ids": p} for p in PROMPTS], params)]

    async def main():
        streams = [await engine.add_request(f"r{i}", {"prompt_token_ids": p},
                                            SamplingParams(temperature=0, max_tokens=12))
                   for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(*(_final(s) for s in streams))

    results = asyncio.run(main())
    assert [r[-1].outputs[0].token_ids for r in results] == expected
    # Streamed: each step adds the new tokens to the previous output.
    for outs in results:
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[-1] == 12


def test_abort_ends_the_stream_and_frees_blocks(engine):
    async def main():
        stream = await engine.add_request("long", {"prompt_token_ids": PROMPTS[3]},
                                          SamplingParams(temperature=0, max_tokens=200))
        outs = []
        async for out in stream:
            outs.append(out)
            if len(outs) == 3:
                engine.abort("long")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 200
    stats = engine.stats()
    assert stats.kv_cache_usage == 0 and stats.num_running == 0
    asyncio.run(engine.call(lambda e: e.check_invariants()))


def test_bad_request_raises_in_add_request(engine):
    async def main():
        with pytest.raises(ValueError, match="max_tokens"):
            await engine.add_request("big", {"prompt_token_ids": [1, 2, 3]},
                                     SamplingParams(max_tokens=10**6))
        return engine.num_waiting

    assert asyncio.run(main()) == 0


def test_failed_step_fails_its_requests_and_the_engine_lives_on(engine, monkeypatch):
    inner: LLMEngine = engine.engine
    real_execute = inner.runner.execute

    def execute(batch):
        if any(s.request.request_id == "doomed" for s in batch.seqs):
            raise RuntimeError("kernel exploded")
        return real_execute(batch)

    monkeypatch.setattr(inner.runner, "execute", execute)
    one_fails_then_one_succeeds(engine, "doomed", "kernel exploded", PROMPTS[1])
    asyncio.run(engine.call(lambda e: e.check_invariants()))


def test_the_event_loop_runs_while_the_engine_steps(engine):
    async def main():
        ticks = 0
        stream = await engine.add_request("r", {"prompt_token_ids": PROMPTS[2]},
                                          SamplingParams(temperature=0, max_tokens=40))
        task = asyncio.ensure_future(_final(stream))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0)
        await task
        return ticks, engine.stats().num_steps

    ticks, steps = asyncio.run(main())
    assert ticks > steps >= 40  # the loop spun between steps instead of waiting on them


def test_shutdown_aborts_live_requests(tiny_model_dir):
    eng = AsyncLLMEngine(tiny_config(tiny_model_dir))
    eng.start()
    eng.wait_ready(120)

    async def main():
        stream = await eng.add_request("r", {"prompt_token_ids": PROMPTS[0]},
                                       SamplingParams(temperature=0, max_tokens=500))
        first = await stream.__aiter__().__anext__()
        await asyncio.to_thread(eng.shutdown)
        rest = [o async for o in stream]
        with pytest.raises(EngineNotReadyError, match="shutting down"):
            await eng.add_request("late", {"prompt_token_ids": [1]}, SamplingParams())
        return first, rest

    first, rest = asyncio.run(main())
    assert not first.finished and rest[-1].outputs[0].finish_reason == "abort"
    assert not eng._thread.is_alive()
    assert eng.stats().kv_cache_usage == 0


def test_load_failure_is_reported():
    def broken(config: EngineConfig) -> LLMEngine:
        raise OSError("no such weights")

    eng = AsyncLLMEngine(EngineConfig(), engine_factory=broken)
    eng.start()
    with pytest.raises(OSError, match="no such weights"):
        eng.wait_ready(30)
    assert not eng.is_ready

    async def main():
        with pytest.raises(EngineNotReadyError):
            await eng.add_request("r", {"prompt_token_ids": [1]}, SamplingParams())

    asyncio.run(main())
    eng.shutdown()


def test_an_error_outside_a_step_fails_live_requests_and_the_loop_lives_on(engine,
                                                                          monkeypatch):
    inner: LLMEngine = engine.engine
    real_schedule = inner.scheduler.schedule
    calls = {"n": 0}

    def schedule():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("scheduler bug")
        return real_schedule()

    monkeypatch.setattr(inner.scheduler, "schedule", schedule)
    one_fails_then_one_succeeds(engine, "a", "scheduling", PROMPTS[0])
