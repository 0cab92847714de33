"""LLMEngine: requests in, outputs out, one `step()` at a time."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from peregrine.attention_backend import AttentionMetadata, allocate_kv_pool
from peregrine.config import EngineConfig
from peregrine.distributed.executor import DistributedExecutor, RankStats
from peregrine.engine.batch import ScheduledBatch
from peregrine.engine.beam_search import BeamSearch, BeamSearchState
from peregrine.engine.detokenizer import IncrementalDetokenizer
from peregrine.engine.kv_cache import KVCacheManager
from peregrine.engine.logprobs import LogprobFormatter
from peregrine.engine.memory_profile import gpu_kv_budget
from peregrine.engine.model_runner import ModelRunner
from peregrine.engine.scheduler import Scheduler
from peregrine.engine.sequence import Request, RequestTimes, Sequence
from peregrine.energy import EnergyAccountant, make_meter
from peregrine.layers.pooling import PoolingType, normalize as normalize_rows, pool_flat
from peregrine.lora.adapter import LoRAAdapter
from peregrine.lora.errors import AdapterBusyError
from peregrine.lora.manager import LoRAManager
from peregrine.lora.request import LoRARequest
from peregrine.memory_model import kv_dtype_bytes, num_blocks_for_memory
from peregrine.models.loader import LoadedModel, load_model
from peregrine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from peregrine.sampling.sampler import SamplerOutput, TokenLogprobs
from peregrine.sampling_params import SamplingParams
from peregrine.spec_decode.metrics import SpecDecodeStats
from peregrine.spec_decode.proposers import build_proposer
from peregrine.structured.acceptance import accept_sampled
from peregrine.structured.grammar import GrammarCache, StructuredOutputs
from peregrine.structured.masking import grammar_prefix

logger = logging.getLogger("peregrine")

PromptType = str | dict[str, Any] | list[int]


@dataclass
class EngineStats:
    """A snapshot of the engine for metrics and logs."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by live sequences
    num_kv_blocks: int
    num_free_blocks: int
    prefix_cache_hit_rate: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    last_step_tokens: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_decode: SpecDecodeStats | None = None  # None when not speculating
    energy_source: str | None = None  # nvml | rapl | model; None when power_source is off
    energy_joules_total: float = 0.0
    cost_usd_total: float = 0.0  # 0 without a price_per_hour
    tokens_per_kwh: float = 0.0  # tokens computed (prompt + generated) per kWh, since start
    tokens_per_usd: float = 0.0  # tokens computed per dollar of device time, since start
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    ranks: list[RankStats] | None = None  # per-rank step time; None in one process


class StepFailedError(RuntimeError):
    """An engine step raised; the requests it was running were aborted (blocks freed)."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"engine step failed; aborted requests {request_ids}")
        self.request_ids = request_ids


class LLMEngine:
    """Owns the model, the KV pool, the scheduler and every live request."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device, dtype = config.torch_device, config.torch_dtype
        t0 = time.perf_counter()
        self.loaded = loaded or load_model(
            config.model, load_format=config.load_format, dtype=dtype, device=device,
            tokenizer=config.tokenizer, max_model_len=config.max_model_len, seed=config.seed,
            quantization=config.quantization, quant_group_size=config.quantization_group_size,
            quant_symmetric=config.quantization_symmetric)
        self.load_time = time.perf_counter() - t0
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings

        # Tensor/pipeline parallel: start the workers, keep rank 0's part of the model; the
        # pool holds this rank's layers and KV heads, as many blocks as on every rank.
        self.executor = DistributedExecutor(config) if config.world_size > 1 else None
        kv_config = (self.model_config if self.executor is None
                     else self.executor.shard(self.loaded.model))
        num_blocks = config.num_kv_blocks or self._blocks_for_budget()
        self.kv_caches = allocate_kv_pool(kv_config, num_blocks, config.block_size,
                                          dtype, device, config.kv_cache_dtype)
        if self.executor is not None:
            self.executor.start(self.loaded.model, self.kv_caches, num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 self.model_config.sliding_window)
        # Most tokens (prompt + output) one sequence can hold: the context, or the KV pool.
        self.context_limit = min(self.max_model_len, num_blocks * config.block_size)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.proposer = build_proposer(config, self.loaded.model, self.kv_caches, num_blocks)
        # Wraps the linears before the runner decides how steps run (no fused step then).
        self.lora = (LoRAManager(self.loaded.model, config.max_loras, config.max_lora_rank,
                                 device, dtype) if config.enable_lora else None)
        self.runner = ModelRunner(config, self.loaded.model, self.kv_caches, config.block_size,
                                  self.proposer, self.lora, self.executor)
        self.spec_stats = SpecDecodeStats()
        self.formatter = LogprobFormatter(self.tokenizer)
        self.beams = BeamSearch(self.scheduler, self.kv, self.tokenizer, self.formatter,
                                self.max_model_len)
        self.grammars: GrammarCache | None = None  # built on the first structured request
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_step_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        meter = make_meter(config.power_source, device, config.power_watts)
        self.energy = (EnergyAccountant(meter, config.price_per_hour)
                       if meter is not None else None)
        self.batch_observer: Callable[[ScheduledBatch], None] | None = None
        """Called with each step's batch after the forward pass and before postprocessing
        advances its sequences (benchmarks attribute step time to prefill and decode)."""
        logger.info("loaded %s in %.1fs: %d KV blocks of %d tokens (%d tokens)",
                    self.loaded.source.name, self.load_time, num_blocks, config.block_size,
                    num_blocks * config.block_size)

    def _blocks_for_budget(self) -> int:
        cfg = self.config
        per_value = kv_dtype_bytes(cfg.kv_cache_dtype, cfg.torch_dtype,
                                   self.model_config.head_dim)
        if cfg.torch_device.type == "cuda":
            budget = gpu_kv_budget(self.loaded.model, cfg, self.max_model_len)
            if budget <= 0:
                raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                                 f"{cfg.gpu_memory_utilization}: raise it, or lower "
                                 "max_num_batched_tokens / max_model_len")
        else:
            budget = cfg.kv_cache_memory * 2**30
        return num_blocks_for_memory(self.model_config, cfg.block_size, per_value, budget)

    # --- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams | None = None, priority: int = 0,
                    arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> Request:
        """Validate and queue a request; ValueError says what is wrong with it. With
        `lora_request` it runs with that adapter (read from disk on its first use)."""
        # A copy: the engine fills in max_tokens, and callers reuse one object for many prompts.
        params = params.clone() if params is not None else SamplingParams()
        params.validate(self.config.max_logprobs)
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        bad_bias = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad_bias:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {bad_bias[0]}")
        bad_stop = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {bad_stop[0]}")
        room = self.max_model_len - len(ids)
        if params.max_tokens is None:
            if room < 1:
                raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room to generate in "
                                 f"the context of {self.max_model_len} tokens")
            params.max_tokens = room
        elif len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens "
                             f"({params.max_tokens}) is longer than the model's context "
                             f"({self.max_model_len} tokens)")
        capacity = self.kv.num_blocks * self.kv.block_size
        if len(ids) + params.max_tokens > capacity:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens "
                             f"({params.max_tokens}) does not fit the KV cache ({capacity} tokens)")
        if params.use_beam_search:
            # Beams share the prompt; each may hold its own copy of every generated block.
            need = (self.kv.blocks_needed(len(ids))
                    + params.beam_width * (self.kv.blocks_needed(params.max_tokens) + 1))
            if need > self.kv.num_blocks:
                raise ValueError(f"beam search with beam_width={params.beam_width} and "
                                 f"max_tokens={params.max_tokens} needs {need} KV blocks, the "
                                 f"pool has {self.kv.num_blocks}")
        # Compiled before anything is queued: an invalid schema or regex refuses the request.
        matchers = (self._grammar_matchers(params.structured, params.num_sequences)
                    if params.structured is not None else None)
        if lora_request is not None:
            self.add_lora(lora_request)
        times = RequestTimes(arrival_time if arrival_time is not None else time.monotonic())
        req = Request(request_id, text, ids, params, priority, times,
                      eos_token_ids=list(self.tokenizer.eos_token_ids),
                      lora_request=lora_request)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first prompt token has no logprob
        if params.use_beam_search:
            req.beam = BeamSearchState(params.beam_width, params.length_penalty)
        for i in range(params.num_sequences):
            seq = Sequence(req, i, params)
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, ids, params.skip_special_tokens, params.stop,
                params.include_stop_str_in_output)
            seq.matcher = matchers[i] if matchers else None
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def _grammar_matchers(self, spec: StructuredOutputs, n: int) -> list:
        """One fresh matcher per sequence of a request constrained by `spec`."""
        if self.grammars is None:
            self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size)
        return [self.grammars.matcher(spec) for _ in range(n)]

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks (unknown ids are ignored)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- LoRA adapters ----------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Read and check an adapter (once per name); InvalidAdapterError (a ValueError)
        says why it cannot be served."""
        if self.lora is None:
            raise ValueError("LoRA adapters need enable_lora=True (--enable-lora)")
        return self.lora.add(lora_request)

    def remove_lora(self, name: str) -> None:
        """Forget an adapter; AdapterNotFoundError if unknown, AdapterBusyError while
        requests use it."""
        if self.lora is None:
            raise ValueError("LoRA adapters need enable_lora=True (--enable-lora)")
        users = [r.request_id for r in self.requests.values() if r.lora_name == name]
        if users:
            raise AdapterBusyError(f"LoRA adapter {name!r} has {len(users)} live requests")
        self.lora.remove(name)

    def list_loras(self) -> list[str]:
        """The names of the adapters this engine has read."""
        return [] if self.lora is None else list(self.lora.adapters)

    # --- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step: schedule, propose drafts, run the model once, process what it sampled."""
        if self.energy is not None:
            self.energy.start_step()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        try:
            if self.lora is not None:  # the running requests' adapters, in slots
                self.lora.activate(self.scheduler.running_loras())
            batch = self.propose(batch)
            sampled = self.runner.execute(batch)
            return self.postprocess(batch, sampled)
        except Exception as e:
            # Fail only this step's requests, and free their blocks, so the engine lives on.
            failed = list(dict.fromkeys(s.request.request_id for s in batch.seqs))
            for request_id in failed:
                self.abort_request(request_id)
            raise StepFailedError(failed) from e

    @torch.inference_mode()
    def embed(self, token_ids: list[list[int]],
              pooling: PoolingType | list[PoolingType] = "last",
              normalize: bool = True) -> torch.Tensor:
        """Pooled final hidden states [N, hidden] (float32, on the CPU) of each token-id
        sequence: its last token's or the mean of its tokens' (vLLM's pooling runner). The
        sequences run as flat prefill batches of about the step's token budget, without
        the KV cache, so generation's blocks are untouched."""
        if not token_ids or any(not ids for ids in token_ids):
            raise ValueError("embed needs at least one sequence, none of them empty")
        methods = [pooling] * len(token_ids) if isinstance(pooling, str) else list(pooling)
        too_long = [len(ids) for ids in token_ids if len(ids) > self.max_model_len]
        if too_long:
            raise ValueError(f"a sequence has {too_long[0]} tokens; the model takes at most "
                             f"{self.max_model_len}")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for ids in token_ids for t in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        budget = self.config.token_budget
        out: list[torch.Tensor] = []
        start = 0
        while start < len(token_ids):
            end, tokens = start, 0
            while end < len(token_ids) and (end == start or
                                            tokens + len(token_ids[end]) <= budget):
                tokens += len(token_ids[end])
                end += 1
            chunk = token_ids[start:end]
            lens = [len(ids) for ids in chunk]
            flat = torch.tensor([t for ids in chunk for t in ids])
            positions = torch.cat([torch.arange(n) for n in lens])
            meta = AttentionMetadata.prefill_only(lens, self.config.torch_device)
            hidden = self.runner.run_model(self.runner.to_device(flat),
                                           self.runner.to_device(positions), meta)
            out.append(pool_flat(hidden, lens, methods[start:end]).cpu())
            start = end
        pooled = torch.cat(out)
        return normalize_rows(pooled) if normalize else pooled

    def propose(self, batch: ScheduledBatch) -> ScheduledBatch:
        """The batch with the proposer's drafts in the slots the scheduler reserved."""
        entries = [i for i, k in enumerate(batch.spec_slots) if k]
        if self.proposer is None or not entries:
            return batch
        seqs = [batch.seqs[i] for i in entries]
        proposed = self.proposer.propose([s.token_ids for s in seqs],
                                         [s.block_table for s in seqs],
                                         [batch.spec_slots[i] for i in entries])
        drafts = list(batch.drafts)
        for i, seq, d in zip(entries, seqs, proposed):  # forbidden drafts are never accepted
            drafts[i] = d if seq.matcher is None else d[:grammar_prefix(seq.matcher, d)]
        return batch.with_drafts(drafts)

    def postprocess(self, batch: ScheduledBatch, sampled: SamplerOutput) -> list[RequestOutput]:
        """Advance computed counts, append sampled tokens, stop finished sequences, and
        report every request that changed."""
        if self.batch_observer is not None:
            self.batch_observer(batch)
        now = time.monotonic()
        self.num_steps += 1
        self.last_step_tokens = batch.num_tokens
        rows = iter(range(len(sampled.token_ids)))
        changed: dict[str, Request] = {}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            samples = batch.samples(i)
            if sampled.prompt_logprobs and seq.seq_id in sampled.prompt_logprobs:
                self._add_prompt_logprobs(seq, sampled.prompt_logprobs[seq.seq_id])
            if seq.is_prefilling:
                self.prompt_tokens_total += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            if not samples:
                continue
            row = next(rows)
            times = seq.request.times
            times.first_token = times.first_token or now
            times.last_token = now
            changed[seq.request.request_id] = seq.request
            if seq.request.beam is not None:
                self.generation_tokens_total += 1
                self.beams.collect(seq, sampled.logprobs[row])
                continue
            tokens = [sampled.token_ids[row]]
            drafts = len(batch.drafts[i])
            if drafts:
                tokens[:0] = sampled.accepted_drafts[row]
            lp = sampled.logprobs[row] if sampled.logprobs else None
            for token in tokens:
                self._append_token(seq, token, lp)
                if self._check_stop(seq, token):
                    break
            if drafts:
                self._roll_back_drafts(seq, drafts, len(tokens) - 1)
        if self.energy is not None:
            self._charge_energy(batch)
        outputs = []
        for req in changed.values():
            if req.beam is not None:
                self.beams.advance(req)
            if req.is_finished:
                req.times.finished = now
                self.requests.pop(req.request_id, None)
            outputs.append(self.make_output(req))
        return outputs

    def _charge_energy(self, batch: ScheduledBatch) -> None:
        """Split the step's energy and cost among its requests by their tokens in it."""
        tokens: dict[str, int] = {}
        reqs: dict[str, Request] = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            rid = seq.request.request_id
            tokens[rid] = tokens.get(rid, 0) + n
            reqs[rid] = seq.request
        for rid, share in zip(tokens, self.energy.end_step(list(tokens.values()))):
            reqs[rid].energy_joules += share.joules
            reqs[rid].cost_usd += share.cost_usd

    def _roll_back_drafts(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """Forget the rejected drafts: their K/V slots count as not computed, and blocks
        that held only them go back to the pool."""
        self.spec_stats.record(num_drafts, num_accepted)
        seq.num_computed_tokens -= num_drafts - num_accepted
        if not seq.is_finished:
            self.kv.trim(seq)

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        """Feed the new token to the detokenizer; finish the sequence if it should stop."""
        # Like EOS, stop strings count only once min_tokens are out (vLLM).
        past_min = seq.num_output_tokens > seq.params.min_tokens
        stop_str = seq.detokenizer.update([token], check_stop=past_min)
        # False for unconstrained sequences
        grammar_done = accept_sampled(seq.matcher, token, seq.request.request_id)
        reason = self._finish_reason(seq, token, stop_str, grammar_done)
        if reason is None:
            return False
        if stop_str is None:
            seq.detokenizer.flush()  # an incomplete character at the very end
        self.scheduler.finish(seq, reason)
        return True

    def _append_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        self.generation_tokens_total += 1
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.cumulative_logprob += logprobs.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(self.formatter.entry(logprobs, seq.params.logprobs))

    def _add_prompt_logprobs(self, seq: Sequence, rows: list[TokenLogprobs]) -> None:
        num = seq.params.prompt_logprobs
        seq.request.prompt_logprobs.extend(self.formatter.entry(r, num) for r in rows)

    def _finish_reason(self, seq: Sequence, token: int, stop_str: str | None,
                       grammar_done: bool = False) -> str | None:
        p = seq.params
        enough = seq.num_output_tokens >= p.min_tokens
        if enough and not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            return "stop"
        if enough and token in p.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if stop_str is not None:
            seq.stop_reason = stop_str
            return "stop"
        if grammar_done:  # the structured output is complete
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def make_output(self, req: Request) -> RequestOutput:
        """The current state of a request as a RequestOutput."""
        p = req.params
        if req.beam is not None:
            outs = self.beams.outputs(req)
        else:
            seqs = req.seqs
            if len(seqs) > p.n:  # best_of: the n samples of highest cumulative logprob
                seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:p.n]
            outs = [CompletionOutput(
                index=i if len(req.seqs) > p.n else s.index,
                text=s.detokenizer.visible_text(s.is_finished), token_ids=s.output_token_ids,
                cumulative_logprob=s.cumulative_logprob if p.needs_sampled_logprobs else None,
                logprobs=None if s.logprobs is None else list(s.logprobs),
                finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for i, s in enumerate(seqs)]
        t = req.times
        e = self.energy
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            outputs=outs, finished=req.is_finished, prompt_logprobs=req.prompt_logprobs,
            lora_request=req.lora_request,
            num_cached_tokens=max(s.num_cached_tokens for s in req.seqs),
            metrics=RequestMetrics(
                t.arrival, t.first_scheduled, t.first_token, t.last_token, t.finished,
                energy_joules=req.energy_joules if e is not None else None,
                energy_source=e.source if e is not None else None,
                cost_usd=req.cost_usd if e is not None and e.prices_cost else None))

    def get_stats(self) -> EngineStats:
        """Counters and gauges of the engine right now."""
        kv = self.kv
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage, num_kv_blocks=kv.num_blocks,
            num_free_blocks=kv.num_free_blocks, prefix_cache_hit_rate=kv.prefix_hit_rate,
            prefix_cache_queries=kv.prefix_queries, prefix_cache_hits=kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
            last_step_tokens=self.last_step_tokens, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            spec_decode=self.spec_stats if self.proposer is not None else None,
            tensor_parallel_size=self.config.tensor_parallel_size,
            pipeline_parallel_size=self.config.pipeline_parallel_size,
            ranks=self.executor.rank_stats() if self.executor is not None else None,
            **self._energy_stats())

    def _energy_stats(self) -> dict[str, Any]:
        e = self.energy
        if e is None:
            return {}
        return {"energy_source": e.source, "energy_joules_total": e.joules_total,
                "cost_usd_total": e.cost_usd_total, "tokens_per_kwh": e.tokens_per_kwh,
                "tokens_per_usd": e.tokens_per_usd}

    def shutdown(self) -> None:
        """Stop the worker processes of tensor/pipeline parallelism (nothing to do in one
        process); the engine cannot step afterwards."""
        if self.executor is not None:
            self.executor.shutdown()

    def check_invariants(self) -> None:
        """Assert the KV pool's bookkeeping matches the live sequences (tests call this)."""
        self.kv.check_invariants(self.scheduler.live_sequences())
