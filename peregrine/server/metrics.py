"""Prometheus metrics of one server: per-request latencies and lengths, engine gauges, counters.

Names follow vLLM's (`vllm:` becomes `peregrine:`) so existing dashboards translate. Each
app has its own CollectorRegistry, so several servers (tests) can live in one process.
Request metrics are observed on the engine thread as outputs come out of a step; engine
gauges are read from the latest EngineStats snapshot when /metrics is scraped. A request
run on a LoRA adapter is labelled with the adapter's name (its `model` in the API), so its
latencies and lengths are series of their own beside the base model's."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peregrine.distributed.executor import RankStats
from peregrine.engine.llm_engine import EngineStats
from peregrine.outputs import RequestOutput

PREFIX = "peregrine:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                          1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Token-count histograms stop here (the model, and so max_model_len, loads after the registry
# is made).
_MAX_TRACKED_LEN = 1_000_000


def length_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (token-count histogram buckets)."""
    out, base = [], 1
    while True:
        for m in (1, 2, 5):
            if base * m > max_len:
                return out
            out.append(base * m)
        base *= 10


@dataclass
class _Track:
    """What the metrics remember about a live request between two steps."""

    model: str  # its model_name label: the served model's, or its LoRA adapter's
    tokens: int = 0
    last_token_time: float | None = None


class _EngineCollector(Collector):
    """Engine gauges and counters, read from the latest EngineStats at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats | None], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        if s is None:  # still loading
            return
        metrics = (ENGINE_METRICS + (SPEC_DECODE_METRICS if s.spec_decode is not None else [])
                   + (ENERGY_METRICS if s.energy_source is not None else []))
        for kind, name, doc, read in metrics:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model], read(s))
            yield family
        if s.spec_decode is not None:
            per_pos = GaugeMetricFamily(PREFIX + "spec_decode_acceptance_by_position",
                                        "Acceptance rate of the draft at each position.",
                                        labels=["model_name", "position"])
            for j, rate in enumerate(s.spec_decode.per_position_acceptance):
                per_pos.add_metric([self._model, str(j)], rate)
            yield per_pos
        for name, doc, read in RANK_METRICS if s.ranks else ():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "rank"])
            for r in s.ranks:
                family.add_metric([self._model, str(r.rank)], read(r))
            yield family
        if s.energy_source is not None:
            info = GaugeMetricFamily(PREFIX + "energy_source_info", "Where energy_joules "
                                     "comes from: nvml or rapl (measured), model (stated "
                                     "wattage x time; docs/cost.md).",
                                     labels=["model_name", "source"])
            info.add_metric([self._model, s.energy_source], 1)
            yield info


# (kind, name, help, how to read it from EngineStats), exported at every scrape.
ENGINE_METRICS: list[tuple[str, str, str, Callable[[EngineStats], float]]] = [
    ("gauge", "num_requests_running", "Sequences in the running batch.",
     lambda s: s.num_running),
    ("gauge", "num_requests_waiting", "Sequences waiting to be scheduled.",
     lambda s: s.num_waiting),
    ("gauge", "kv_cache_usage", "Fraction of KV blocks held by live requests (cached free "
     "blocks count as free).", lambda s: s.kv_cache_usage),
    ("gauge", "kv_cache_blocks", "KV blocks in the pool.", lambda s: s.num_kv_blocks),
    ("gauge", "prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt "
     "tokens looked up.", lambda s: s.prefix_cache_hit_rate),
    ("counter", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     lambda s: s.prefix_cache_queries),
    ("counter", "prefix_cache_hits", "Prompt tokens served from the prefix cache.",
     lambda s: s.prefix_cache_hits),
    ("counter", "num_preemptions", "Sequences preempted (to be recomputed).",
     lambda s: s.num_preemptions),
    ("counter", "prompt_tokens", "Prompt tokens computed (prefill).",
     lambda s: s.prompt_tokens_total),
    ("counter", "generation_tokens", "Tokens generated.", lambda s: s.generation_tokens_total),
    ("counter", "engine_steps", "Engine steps run.", lambda s: s.num_steps),
    ("gauge", "tensor_parallel_size", "Processes splitting every layer (docs/distributed.md).",
     lambda s: s.tensor_parallel_size),
    ("gauge", "pipeline_parallel_size", "Processes holding contiguous stages of the layers.",
     lambda s: s.pipeline_parallel_size),
]
# Per rank of a parallel engine: (name, help, what to read from its RankStats).
RANK_METRICS: list[tuple[str, str, Callable[[RankStats], float]]] = [
    ("rank_step_seconds", "Mean busy time of a rank per step since start (compute, "
     "communication and step messages).", lambda r: r.step_seconds),
    ("rank_comm_seconds", "Mean time of a rank per step in collectives and transfers, waiting "
     "for slower ranks included.", lambda r: r.comm_seconds),
]
# Exported when the engine meters energy (power_source is not off); docs/cost.md.
ENERGY_METRICS: list[tuple[str, str, str, Callable[[EngineStats], float]]] = [
    ("counter", "energy_joules", "Joules of the engine's steps (see energy_source_info).",
     lambda s: s.energy_joules_total),
    ("counter", "cost_usd", "Device time of the engine's steps x --price-per-hour (0 "
     "unpriced).", lambda s: s.cost_usd_total),
    ("gauge", "tokens_per_kwh", "Tokens computed (prompt + generated) per kWh since start.",
     lambda s: s.tokens_per_kwh),
    ("gauge", "tokens_per_usd", "Tokens computed (prompt + generated) per dollar of device "
     "time since start (0 unpriced).", lambda s: s.tokens_per_usd),
]
SPEC_DECODE_METRICS: list[tuple[str, str, str, Callable[[EngineStats], float]]] = [
    ("counter", "spec_decode_num_drafts", "Sequence-steps that verified draft tokens.",
     lambda s: s.spec_decode.num_verifications),
    ("counter", "spec_decode_num_draft_tokens", "Draft tokens proposed.",
     lambda s: s.spec_decode.num_draft_tokens),
    ("counter", "spec_decode_num_accepted_tokens", "Draft tokens accepted.",
     lambda s: s.spec_decode.num_accepted_tokens),
    ("gauge", "spec_decode_acceptance_rate", "Accepted / proposed draft tokens.",
     lambda s: s.spec_decode.acceptance_rate),
    ("gauge", "spec_decode_mean_accepted_length", "Tokens a speculating sequence gains per "
     "step (accepted drafts + 1).", lambda s: s.spec_decode.mean_accepted_length),
]


class _Merged(Collector):
    """Several registries read as one; same-named families are merged, since a family's
    HELP and TYPE may appear only once in an exposition."""

    def __init__(self, registries: list[CollectorRegistry]) -> None:
        self._registries = registries

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for registry in self._registries:
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation,
                                                            family.type, family.unit)
                merged.samples.extend(family.samples)
        return families.values()


class ServerMetrics:
    """The registry of one server; also the engine's observer (called on the engine thread)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        disable_created_metrics()  # `*_created` series only add noise to every scrape
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            family = Histogram(PREFIX + name, doc, labels, registry=reg, buckets=tuple(buckets))
            family.labels(model_name)  # the served model's series exist from the start
            return family

        # Per request, labelled by request (a LoRA adapter's requests by its name).
        self.ttft = histogram("time_to_first_token_seconds",
                              "Arrival to first generated token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between two steps that gave a request new tokens.",
                             _TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "(last token - first token) / (output tokens - 1), per request.",
                              _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.",
                             _REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival to first scheduled.", _REQUEST_BUCKETS)
        lengths = length_buckets(_MAX_TRACKED_LEN)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt length of finished "
                                    "requests.", lengths)
        self.gen_len = histogram("request_generation_tokens", "Generated tokens of finished "
                                 "requests (all n samples).", lengths)
        self.finished = Counter(PREFIX + "request_success", "Finished requests by finish "
                                "reason (stop, length, abort, error).",
                                ["model_name", "finished_reason"], registry=reg)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused before "
                                "reaching the engine, by reason (queue_full, invalid, "
                                "unauthorized, ...).", ["model_name", "reason"], registry=reg)
        self.coalesced = Counter(PREFIX + "coalesced_requests", "Requests attached to an "
                                 "identical one in flight instead of running their own "
                                 "(--request-coalescing).", labels, registry=reg
                                 ).labels(model_name)
        self.tokens_saved = Counter(PREFIX + "coalesced_tokens_saved", "Generated tokens "
                                    "delivered to coalesced requests that the engine did not "
                                    "compute again.", labels, registry=reg).labels(model_name)
        # The semantic cache (--semantic-cache); zero while it is off.
        self.cache_requests = Counter(PREFIX + "semantic_cache_requests", "Requests by what "
                                      "the semantic cache did: hit, miss, bypass (not "
                                      "eligible or refused).", ["model_name", "result"],
                                      registry=reg)
        self.cache_rejections = Counter(PREFIX + "semantic_cache_rejected_candidates",
                                        "Vector matches the verifier refused, by reason "
                                        "(number, negation, entity, order, format, content).",
                                        ["model_name", "reason"], registry=reg)
        self.cache_saved_tokens = Counter(PREFIX + "semantic_cache_saved_tokens", "Completion "
                                          "tokens served from the cache instead of generated.",
                                          labels, registry=reg).labels(model_name)
        self.cache_saved_seconds = Counter(PREFIX + "semantic_cache_saved_seconds", "Seconds "
                                           "the cached answers took to generate originally.",
                                           labels, registry=reg).labels(model_name)
        self.cache_stores = Counter(PREFIX + "semantic_cache_stored", "Answers stored.",
                                    labels, registry=reg).labels(model_name)
        self.cache_evictions = Counter(PREFIX + "semantic_cache_evicted", "Answers dropped, by "
                                       "reason (ttl, entries, bytes).",
                                       ["model_name", "reason"], registry=reg)
        self.cache_lookup = histogram("semantic_cache_lookup_seconds", "Time to look a request "
                                      "up (embedding, search, verification).",
                                      (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                       0.25, 0.5, 1.0)).labels(model_name)
        self._cache_entries = Gauge(PREFIX + "semantic_cache_entries", "Answers in the cache.",
                                    labels, registry=reg).labels(model_name)
        self._cache_bytes = Gauge(PREFIX + "semantic_cache_bytes", "Bytes of questions, "
                                  "answers and vectors in the cache.", labels,
                                  registry=reg).labels(model_name)
        reg.register(_EngineCollector(stats, model_name))
        self._live: dict[str, _Track] = {}

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    @staticmethod
    def render_all(servers: "Iterable[ServerMetrics]") -> bytes:
        """One exposition of several models' metrics (one registry each): a family the
        models share is written once, with every model's samples under it."""
        return generate_latest(_Merged([m.registry for m in servers]))

    def reject(self, reason: str) -> None:
        """Count a request refused by the server (queue full, bad input, bad key)."""
        self.rejected.labels(self.model_name, reason).inc()

    # --- CoalescingObserver ------------------------------------------------------------------
    def on_coalesced(self) -> None:
        """Count a request that joined an identical one in flight."""
        self.coalesced.inc()

    def on_tokens_saved(self, tokens: int) -> None:
        """Count generated tokens delivered to coalesced requests without computing them."""
        self.tokens_saved.inc(tokens)
    # --- the semantic cache -----------------------------------------------------------------
    def cache_result(self, result: str) -> None:
        """Count a request the cache hit, missed or bypassed."""
        self.cache_requests.labels(self.model_name, result).inc()

    def cache_rejected(self, reason: str) -> None:
        """Count a candidate the verifier refused."""
        self.cache_rejections.labels(self.model_name, reason).inc()

    def cache_saved(self, tokens: int, seconds: float) -> None:
        """Count what a hit saved."""
        self.cache_saved_tokens.inc(tokens)
        self.cache_saved_seconds.inc(max(seconds, 0.0))

    def cache_stored(self) -> None:
        """Count an answer stored."""
        self.cache_stores.inc()

    def cache_evicted(self, reason: str, count: int) -> None:
        """Count answers the store dropped."""
        self.cache_evictions.labels(self.model_name, reason).inc(count)

    def watch_cache(self, entries: Callable[[], float], nbytes: Callable[[], float]) -> None:
        """Read the cache's size at each scrape."""
        self._cache_entries.set_function(entries)
        self._cache_bytes.set_function(nbytes)

    # --- EngineObserver ---------------------------------------------------------------------
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Observe token latencies of every request a step advanced; close finished ones."""
        for out in outputs:
            track = self._live.get(out.request_id)
            if track is None:
                lora = out.lora_request
                track = self._live[out.request_id] = _Track(
                    self.model_name if lora is None else lora.lora_name)
            m = out.metrics
            tokens = sum(len(o.token_ids) for o in out.outputs)
            if m is not None and tokens > track.tokens and m.last_token_time is not None:
                if track.last_token_time is None:
                    if m.first_token_time is not None:
                        self.ttft.labels(track.model).observe(m.first_token_time
                                                              - m.arrival_time)
                else:
                    self.itl.labels(track.model).observe(m.last_token_time
                                                         - track.last_token_time)
                track.tokens, track.last_token_time = tokens, m.last_token_time
            if out.finished:
                self._live.pop(out.request_id, None)
                self._observe_finished(out, track.model)

    def on_failed(self, request_ids: list[str]) -> None:
        """Count requests that an engine failure ended."""
        for request_id in request_ids:
            track = self._live.pop(request_id, None)
            model = self.model_name if track is None else track.model
            self.finished.labels(model, "error").inc()

    def _observe_finished(self, out: RequestOutput, model: str) -> None:
        reasons = [o.finish_reason for o in out.outputs]
        reason = "abort" if "abort" in reasons else (reasons[0] or "abort")
        self.finished.labels(model, reason).inc()
        self.prompt_len.labels(model).observe(len(out.prompt_token_ids))
        self.gen_len.labels(model).observe(sum(len(o.token_ids) for o in out.outputs))
        m = out.metrics
        if m is None:
            return
        if m.finished_time is not None:
            self.e2e.labels(model).observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue_time.labels(model).observe(m.first_scheduled_time - m.arrival_time)
        longest = max(len(o.token_ids) for o in out.outputs)
        if longest > 1 and m.first_token_time is not None and m.last_token_time is not None:
            self.tpot.labels(model).observe((m.last_token_time - m.first_token_time)
                                            / (longest - 1))
