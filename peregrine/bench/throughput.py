"""Offline throughput of our engine: a whole workload queued at once, stepped to the end."""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any

from peregrine.bench.datasets import BenchRequest
from peregrine.bench.energy import RunEnergy
from peregrine.bench.phases import EngineStepTimer
from peregrine.bench.results import throughput_run
from peregrine.bench.roofline import DevicePeak, ModelCost, state_dict_bytes
from peregrine.config import EngineConfig
from peregrine.engine.kv_cache import kv_dtype_bytes
from peregrine.engine.llm_engine import LLMEngine
from peregrine.models.loader import LoadedModel, load_model
from peregrine.sampling_params import SamplingParams


def bench_params(output_len: int) -> SamplingParams:
    """Greedy, exactly `output_len` tokens (EOS does not stop it): every engine does the
    same amount of work whatever the model says."""
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


def load_for(config: EngineConfig) -> LoadedModel:
    """Load the model `config` names, once, for several engines to share."""
    return load_model(config.model, load_format=config.load_format, dtype=config.torch_dtype,
                      device=config.torch_device, tokenizer=config.tokenizer,
                      max_model_len=config.max_model_len, seed=config.seed,
                      quantization=config.quantization,
                      quant_group_size=config.quantization_group_size,
                      quant_symmetric=config.quantization_symmetric)


def engine_cost(engine: LLMEngine) -> ModelCost:
    """The roofline cost model of an engine's loaded model, KV dtype included."""
    cfg = engine.model_config
    model = engine.loaded.model
    stored = state_dict_bytes(model)
    if getattr(model.lm_head, "weight", None) is not model.embed_tokens.weight:
        # an untied (or quantized) LM head: the float embedding table is looked up one row
        # per token, never streamed, so it is no part of the bytes a forward reads
        w = model.embed_tokens.weight
        stored -= w.numel() * w.element_size()
    bytes_per_param = stored / cfg.num_params()
    kv_bytes = kv_dtype_bytes(engine.config.kv_cache_dtype, engine.config.torch_dtype)
    return ModelCost.from_config(cfg, bytes_per_param, kv_bytes)


def warm_up(engine: LLMEngine) -> None:
    """Run two short requests so one-time costs (allocator, thread pools, lazy init) stay
    out of the measurement."""
    for i in range(2):
        engine.add_request(f"warmup-{i}", {"prompt_token_ids": [1 + i] * 16}, bench_params(4))
    while engine.has_unfinished_requests():
        engine.step()


def run_peregrine(requests: list[BenchRequest], config: EngineConfig, peak: DevicePeak,
                  loaded: LoadedModel | None = None, warmup: bool = True) -> dict[str, Any]:
    """Queue every request at once and step until all finish; one throughput run."""
    engine = LLMEngine(config, loaded=loaded)
    if warmup:
        warm_up(engine)
    timer = EngineStepTimer(engine, engine_cost(engine))
    energy = RunEnergy(engine)
    t0 = time.perf_counter()
    ids = [engine.add_request(None, r.engine_prompt(), bench_params(r.output_len)).request_id
           for r in requests]
    final = timer.run_until_done()
    wall = time.perf_counter() - t0
    timer.close()
    output_tokens = sum(len(final[i].outputs[0].token_ids) for i in ids)
    prompt_tokens = sum(r.prompt_len for r in requests)
    joules = energy.summary(output_tokens, prompt_tokens + output_tokens, wall)
    stats = engine.get_stats()
    settings = {"batching": config.batching, "max_num_seqs": config.max_num_seqs,
                "max_num_batched_tokens": config.token_budget,
                "enable_chunked_prefill": config.enable_chunked_prefill,
                "enable_prefix_caching": config.enable_prefix_caching,
                "dtype": str(config.torch_dtype).removeprefix("torch."),
                "device": str(config.torch_device), "threads": config.num_threads,
                "kv_cache_blocks": stats.num_kv_blocks, "block_size": config.block_size,
                "load_format": engine.loaded.source.format}
    return throughput_run(
        engine="peregrine", label=f"peregrine ({config.batching})", settings=settings,
        requests=requests, output_tokens=output_tokens, wall_s=wall, phases=timer.phases,
        peak=peak, cost=timer.cost, preemptions=stats.num_preemptions,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        **({"energy": joules} if joules is not None else {}))


def run_batchings(requests: list[BenchRequest], config: EngineConfig, batchings: list[str],
                  peak: DevicePeak, warmup: bool = True) -> list[dict[str, Any]]:
    """The same workload under each batching policy, one engine after another on one loaded
    model (each engine gets a fresh KV pool)."""
    loaded = load_for(config)
    runs = []
    for batching in batchings:
        cfg = dataclasses.replace(config, batching=batching)
        runs.append(run_peregrine(requests, cfg, peak, loaded, warmup))
        gc.collect()  # free the previous engine's KV pool before the next allocates its own
    return runs
