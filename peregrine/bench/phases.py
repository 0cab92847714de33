"""Time spent in prefill and in decode: per-step work, attribution of mixed steps, totals.

Every engine we measure yields a sequence of steps (forward passes), each timed on the
wall clock and described by the work it did (`StepWork`). A step that only prefills or
only decodes goes wholly to that phase. A mixed step (chunked prefill shares a forward pass
with decodes) is split in proportion to FLOPs: the prefill part gets
`seconds x prefill_flops / (prefill_flops + decode_flops)` and the same fraction of the
weight bytes the pass read; each part keeps its own KV-cache bytes. FLOPs are the fair
split of a forward pass's compute, and in a mixed step the compute of the prefill chunk
dominates; the split under-charges decode for the weight reads it would need alone, which
is why the mixed-step share of the time is reported next to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peregrine.bench.roofline import DevicePeak, ModelCost, mbu, mfu

if TYPE_CHECKING:
    from peregrine.engine.batch import ScheduledBatch
    from peregrine.engine.llm_engine import LLMEngine
    from peregrine.outputs import RequestOutput


@dataclass
class StepWork:
    """The work of one forward pass, split into its prefill and decode parts."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_flops: float = 0.0
    decode_flops: float = 0.0
    prefill_kv_bytes: float = 0.0
    decode_kv_bytes: float = 0.0

    def add_prefill(self, cost: ModelCost, start: int, n: int, logits: bool = True) -> None:
        """Count a prefill chunk of n tokens starting at position `start`."""
        self.prefill_tokens += n
        self.prefill_flops += cost.chunk_flops(start, n, logits)
        self.prefill_kv_bytes += cost.chunk_kv_bytes(start, n)

    def add_decode(self, cost: ModelCost, position: int) -> None:
        """Count one decode token at `position`."""
        self.decode_tokens += 1
        self.decode_flops += cost.chunk_flops(position, 1)
        self.decode_kv_bytes += cost.chunk_kv_bytes(position, 1)

    @classmethod
    def of_batch(cls, batch: "ScheduledBatch", cost: ModelCost) -> "StepWork":
        """The work of one of our engine's scheduled batches (before postprocess advances
        it). A sequence decodes once its whole prompt is in the cache (with speculation,
        its draft positions count as decode work too); everything before that, including
        the recompute of a preempted sequence, is prefill."""
        work = cls()
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            if start >= seq.num_prompt_tokens and n == 1 + len(batch.drafts[i]):
                for j in range(n):  # the last token and any drafts verified with it
                    work.add_decode(cost, start + j)
            else:
                work.add_prefill(cost, start, n, logits=batch.samples(i))
        return work


@dataclass
class PhaseTotals:
    """Accumulated time and work of one phase (prefill or decode)."""

    tokens: int = 0
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    steps: int = 0

    def summary(self, peak: DevicePeak) -> dict[str, float]:
        """Tokens/s, achieved FLOP/s and bytes/s, MFU and MBU of this phase."""
        s = self.seconds
        return {"tokens": self.tokens, "seconds": s, "steps": self.steps,
                "tokens_per_s": self.tokens / s if s > 0 else 0.0,
                "tflops_per_s": self.flops / s / 1e12 if s > 0 else 0.0,
                "gbytes_per_s": self.bytes / s / 1e9 if s > 0 else 0.0,
                "mfu": mfu(self.flops, s, peak), "mbu": mbu(self.bytes, s, peak)}


@dataclass
class PhaseAccounting:
    """Attributes timed steps to prefill and decode (see the module docstring)."""

    weight_bytes: float  # bytes of weights one forward pass reads
    prefill: PhaseTotals = field(default_factory=PhaseTotals)
    decode: PhaseTotals = field(default_factory=PhaseTotals)
    num_steps: int = 0
    mixed_steps: int = 0
    mixed_seconds: float = 0.0
    other_seconds: float = 0.0  # time outside forward passes (idle or empty steps)

    def add(self, seconds: float, work: StepWork) -> None:
        """Account one timed forward pass."""
        total = work.prefill_flops + work.decode_flops
        share = work.prefill_flops / total if total > 0 else float(work.prefill_tokens > 0)
        self.num_steps += 1
        if work.prefill_tokens and work.decode_tokens:
            self.mixed_steps += 1
            self.mixed_seconds += seconds
        for phase, frac, tokens, flops, kv in (
                (self.prefill, share, work.prefill_tokens, work.prefill_flops,
                 work.prefill_kv_bytes),
                (self.decode, 1.0 - share, work.decode_tokens, work.decode_flops,
                 work.decode_kv_bytes)):
            if tokens:
                phase.tokens += tokens
                phase.seconds += seconds * frac
                phase.flops += flops
                phase.bytes += self.weight_bytes * frac + kv
                phase.steps += 1

    def summary(self, peak: DevicePeak) -> dict[str, Any]:
        """Both phases plus how many steps were mixed and how much time they took."""
        timed = self.prefill.seconds + self.decode.seconds
        return {"prefill": self.prefill.summary(peak), "decode": self.decode.summary(peak),
                "steps": {"forward_passes": self.num_steps, "mixed": self.mixed_steps,
                          "mixed_time_fraction": self.mixed_seconds / timed if timed else 0.0,
                          "seconds_outside_forward": self.other_seconds}}


class EngineStepTimer:
    """Drives one of our engines step by step, timing each step and recording its work
    through the engine's `batch_observer` hook."""

    def __init__(self, engine: "LLMEngine", cost: ModelCost) -> None:
        self.engine = engine
        self.cost = cost
        self.phases = PhaseAccounting(cost.weight_bytes)
        self.step_log: list[tuple[float, StepWork]] = []
        self._work: StepWork | None = None
        engine.batch_observer = self._observe

    def _observe(self, batch: "ScheduledBatch") -> None:
        self._work = StepWork.of_batch(batch, self.cost)

    def step(self) -> list["RequestOutput"]:
        """One engine step, timed and attributed."""
        self._work = None
        t0 = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - t0
        if self._work is None:
            self.phases.other_seconds += seconds
        else:
            self.phases.add(seconds, self._work)
            self.step_log.append((seconds, self._work))
        return outputs

    def run_until_done(self) -> dict[str, "RequestOutput"]:
        """Step until no request is left; the final output of every request by id."""
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return final

    def close(self) -> None:
        """Detach from the engine."""
        self.engine.batch_observer = None
