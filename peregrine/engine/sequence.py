"""Requests and their sequences: the state the scheduler and the step loop move forward."""

from __future__ import annotations

import enum
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from peregrine.lora.request import LoRARequest
from peregrine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher

    from peregrine.engine.detokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass
class RequestTimes:
    """Wall-clock times (time.monotonic) of a request's milestones, for metrics."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Sequence:
    """One output stream: the prompt, the tokens generated so far and its place in the cache.

    `num_computed_tokens` tokens have their K/V in the cache; every step computes some of
    the rest. A sequence is "prefilling" while fewer than all prompt tokens are computed."""

    def __init__(self, request: "Request", index: int, params: SamplingParams) -> None:
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index  # which of the request's n samples this is
        self.params = params
        self.token_ids: list[int] = list(request.prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer: IncrementalDetokenizer | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Any]] | None = [] if params.logprobs is not None else None
        self.num_preemptions = 0
        self.generator: random.Random | None = None  # seeded requests sample from their own
        self.spec_generator: torch.Generator | None = None  # seeded rejection sampling
        self.matcher: GrammarMatcher | None = None  # of a structured-output request

    # --- views ------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def collects_prompt_logprobs(self) -> bool:
        """Whether this sequence's prefill must still produce prompt logprobs (the first
        sample of a request that asked for them, until every prompt position has one)."""
        collected = self.request.prompt_logprobs
        return (self.index == 0 and collected is not None
                and len(collected) < self.num_prompt_tokens)

    def fork(self, index: int) -> "Sequence":
        """A copy of this sequence as a new sample `index` of the same request (beam search);
        the caller shares the blocks (KVCacheManager.fork) and queues it."""
        if self.matcher is not None:  # SamplingParams refuses beam search + structured
            raise ValueError("a structured-output sequence cannot be forked")
        child = Sequence(self.request, index, self.params)
        child.token_ids = list(self.token_ids)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.detokenizer = None if self.detokenizer is None else self.detokenizer.fork()
        return child

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then earlier arrival."""
        return (self.request.priority, self.request.times.arrival, self.seq_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")


@dataclass
class Request:
    """A client's request: one prompt, its sampling parameters and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    times: RequestTimes = field(default_factory=lambda: RequestTimes(time.monotonic()))
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    eos_token_ids: list[int] = field(default_factory=list)  # suppressed until min_tokens
    beam: Any = None  # BeamSearchState while a beam search runs
    prompt_tensor: torch.Tensor | None = None  # prompt ids on the device (repetition penalty)
    energy_joules: float = 0.0  # its token share of the energy of every step it was in
    cost_usd: float = 0.0  # its token share of those steps' wall time x price_per_hour
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)

    @property
    def lora_name(self) -> str | None:
        """The adapter's name, None for the base model."""
        return None if self.lora_request is None else self.lora_request.lora_name

    def prompt_ids_on(self, device: torch.device) -> torch.Tensor:
        """The prompt token ids as a tensor on `device`, built once per request."""
        if self.prompt_tensor is None:  # an engine runs on one device
            self.prompt_tensor = torch.tensor(self.prompt_token_ids, device=device)
        return self.prompt_tensor

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
