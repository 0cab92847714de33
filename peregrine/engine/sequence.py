"""Requests and their sequences: the state the scheduler and the step loop move forward."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from peregrine.sampling_params import SamplingParams

if TYPE_CHECKING:
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
        self.output_text = ""
        self.detokenizer: IncrementalDetokenizer | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Any]] | None = [] if params.logprobs is not None else None
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None  # seeded requests sample from their own

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

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
