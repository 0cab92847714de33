"""Latency of our engine: time to first token by prompt length, and time per output token
(decode speed) by batch size."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from peregrine.bench.energy import RunEnergy
from peregrine.bench.phases import EngineStepTimer, PhaseAccounting, StepWork
from peregrine.bench.roofline import DevicePeak
from peregrine.bench.stats import summarize
from peregrine.bench.throughput import bench_params, engine_cost, warm_up
from peregrine.config import EngineConfig
from peregrine.engine.llm_engine import LLMEngine


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Ids from 100 up skip the control tokens at the start of common vocabularies.
    low = min(100, vocab // 2)
    return [rng.randrange(low, vocab) for _ in range(n)]


def _phases(steps: list[tuple[float, StepWork]], weight_bytes: float) -> PhaseAccounting:
    phases = PhaseAccounting(weight_bytes)
    for seconds, work in steps:
        phases.add(seconds, work)
    return phases


def measure_ttft(timer: EngineStepTimer, prompt_len: int, iters: int, rng: random.Random,
                 peak: DevicePeak) -> dict[str, Any]:
    """One request at a time with a fresh random prompt of `prompt_len` tokens and one
    output token: TTFT is the wall time from queueing it to its token."""
    engine = timer.engine
    vocab = engine.model_config.vocab_size
    times = []
    timer.step_log.clear()
    for _ in range(iters):
        t0 = time.perf_counter()
        engine.add_request(None, {"prompt_token_ids": _random_ids(rng, prompt_len, vocab)},
                           bench_params(1))
        timer.run_until_done()
        times.append(time.perf_counter() - t0)
    phases = _phases(timer.step_log, timer.phases.weight_bytes)
    prefill = phases.prefill.summary(peak)
    return {"prompt_len": prompt_len, "iters": iters, "ttft_ms": summarize(times, 1000),
            "prefill_tokens_per_s": prefill["tokens_per_s"], "prefill_mfu": prefill["mfu"],
            "steps_per_request": phases.num_steps / iters}


def measure_decode(timer: EngineStepTimer, batch_size: int, prompt_len: int, output_len: int,
                   rng: random.Random, peak: DevicePeak) -> dict[str, Any]:
    """`batch_size` requests decoding together: the time of each step in which all of them
    decode (and nothing prefills) is the TPOT at that batch size."""
    engine = timer.engine
    vocab = engine.model_config.vocab_size
    timer.step_log.clear()
    energy = RunEnergy(engine)
    t0 = time.perf_counter()
    for _ in range(batch_size):
        engine.add_request(None, {"prompt_token_ids": _random_ids(rng, prompt_len, vocab)},
                           bench_params(output_len))
    timer.run_until_done()
    # the whole run's energy: the prompts' prefill is in it
    figures = energy.summary(batch_size * output_len,
                             batch_size * (prompt_len + output_len), time.perf_counter() - t0)
    steps = [(s, w) for s, w in timer.step_log
             if w.decode_tokens == batch_size and w.prefill_tokens == 0]
    if not steps:
        raise ValueError(f"no step decoded all {batch_size} sequences together; raise "
                         "--max-num-seqs or --kv-cache-memory")
    decode = _phases(steps, timer.phases.weight_bytes).decode.summary(peak)
    median = statistics.median(s for s, _ in steps)
    return {"batch_size": batch_size, "prompt_len": prompt_len, "decode_steps": len(steps),
            "tpot_ms": summarize([s for s, _ in steps], 1000),
            "tokens_per_s": batch_size / median, "tokens_per_s_per_seq": 1 / median,
            "mbu": decode["mbu"], "mfu": decode["mfu"],
            **({"energy": figures} if figures is not None else {})}


def run_latency(config: EngineConfig, peak: DevicePeak, input_lens: list[int],
                batch_sizes: list[int], output_len: int = 32, decode_prompt_len: int = 128,
                iters: int = 3, seed: int = 0, warmup: bool = True) -> dict[str, Any]:
    """TTFT for each prompt length, then TPOT for each batch size, on one engine."""
    if output_len < 2:
        raise ValueError(f"output_len must be >= 2 to time decode steps, got {output_len}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    engine = LLMEngine(config)
    if warmup:
        warm_up(engine)
    timer = EngineStepTimer(engine, engine_cost(engine))
    rng = random.Random(seed)
    ttft = [measure_ttft(timer, n, iters, rng, peak) for n in input_lens]
    decode = [measure_decode(timer, b, decode_prompt_len, output_len, rng, peak)
              for b in batch_sizes]
    timer.close()
    settings = {"batching": config.batching, "max_num_seqs": config.max_num_seqs,
                "max_num_batched_tokens": config.token_budget,
                "dtype": str(config.torch_dtype).removeprefix("torch."),
                "device": str(config.torch_device), "threads": config.num_threads,
                "output_len": output_len, "decode_prompt_len": decode_prompt_len,
                "iters": iters, "model": engine.loaded.source.name}
    return {"kind": "latency", "engine": "peregrine", "settings": settings, "ttft": ttft,
            "decode": decode, "peak": peak.to_dict()}
