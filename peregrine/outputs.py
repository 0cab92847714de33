"""What the engine returns: one RequestOutput per request, with one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peregrine.lora.request import LoRARequest


@dataclass
class Logprob:
    """A token's log-probability, its rank in the distribution and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sample."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic) of a request's milestones, and what it has consumed."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    energy_joules: float | None = None  # None when the engine's power_source is off
    energy_source: str | None = None  # nvml | rapl | model
    cost_usd: float | None = None  # None when the engine has no price_per_hour


@dataclass
class RequestOutput:
    """The state of one request after a step (or at the end, from LLM.generate)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    lora_request: LoRARequest | None = None  # the adapter it ran with (None: the base model)
