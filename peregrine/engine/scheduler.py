"""The scheduler: which sequences run this step, and how many tokens of each.

Continuous batching: sequences join and leave the running set at every step. Each step
has a token budget and a sequence cap; running sequences go first (decodes and the rest
of chunked prefills, in priority order), then waiting ones are admitted with as much of
their prompt as the budget leaves (chunked prefill), so prefill and decode of different
requests share one forward pass. When the KV pool runs dry, the lowest-priority (latest)
running sequence is preempted: its blocks are freed and it will be recomputed.

`static` and `dynamic` batching are the baselines continuous batching is measured
against: a batch is admitted only when nothing runs, and runs until all of it finishes
(dynamic waits up to `batch_wait_ms` for the batch to fill before starting)."""

from __future__ import annotations

import bisect
import time

from peregrine.config import EngineConfig
from peregrine.engine.batch import ScheduledBatch
from peregrine.engine.kv_cache import KVCacheManager
from peregrine.engine.sequence import Sequence, SequenceStatus


def can_speculate(seq: Sequence) -> bool:
    """Whether verification reproduces this sequence's own sampling exactly: it needs no
    per-position state the verifier does not track (penalties over the tokens before each
    draft, min_tokens still pending, per-token logprobs, beams)."""
    p = seq.params
    return not (p.use_beam_search or p.logprobs is not None or p.repetition_penalty != 1
                or p.frequency_penalty or p.presence_penalty
                or seq.num_output_tokens < p.min_tokens)


class Scheduler:
    """Owns the waiting and running queues and the KV block manager."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.chunked = config.enable_chunked_prefill
        # Without chunking a whole prompt must fit one step.
        self.token_budget = (config.token_budget if self.chunked
                             else max(config.token_budget, max_model_len))
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []  # sorted by Sequence.sort_key
        self.num_preemptions = 0
        self.num_spec = config.num_speculative_tokens if config.speculative else 0
        self.max_loras = config.max_loras if config.enable_lora else 0

    # --- queues --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new (or preempted) sequence by priority, then arrival."""
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def add_fork(self, child: Sequence) -> None:
        """Queue a sequence forked from a live one (beam search) beside its parent: running
        if the parent runs (it shares the parent's blocks), else waiting."""
        if child.status is SequenceStatus.RUNNING:
            bisect.insort(self.running, child, key=Sequence.sort_key)
        else:
            self.add(child)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from whichever queue holds it and free its blocks."""
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
        self.kv.free(seq)

    def live_sequences(self) -> list[Sequence]:
        return self.running + self.waiting

    def running_loras(self) -> set[str]:
        """The adapters of the running sequences (at most max_loras)."""
        return {s.request.lora_name for s in self.running} - {None}

    # --- one step -------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Pick this step's sequences and token counts, allocating their KV slots."""
        batch = ScheduledBatch()
        budget = self.token_budget
        scheduled: list[tuple[Sequence, int, int]] = []  # (seq, new tokens, draft slots)

        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted earlier in this loop, or no budget left
            n = seq.num_tokens - seq.num_computed_tokens
            if n == 0:
                continue  # a beam waiting for its siblings' candidates: nothing to compute
            if n > budget and not self.chunked:
                continue  # an unchunked prompt runs whole, in a later step
            n = min(n, budget)
            spec = self._draft_room(seq, budget - n) if n == 1 else 0
            self.kv.free_out_of_window(seq)
            while not self.kv.allocate(seq, n + spec):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n, spec))
                budget -= n + spec

        if not batch.preempted and self._admission_open():
            # A static/dynamic batch is admitted whole even when this step's budget covers
            # only part of its prompts; the rest are prefilled in the following steps.
            whole_batch = self.config.batching != "continuous"
            loras = self.running_loras()
            i = 0  # waiting sequences whose adapter finds no slot are passed over
            while (i < len(self.waiting) and len(self.running) < self.config.max_num_seqs
                   and (budget > 0 or whole_batch)):
                seq = self.waiting[i]
                lora = seq.request.lora_name
                if lora is not None and lora not in loras and len(loras) >= self.max_loras:
                    i += 1
                    continue
                # Prompt logprobs need the logits of every prompt position: no cache skip.
                fresh = seq.num_computed_tokens == 0 and not seq.collects_prompt_logprobs
                hits = self.kv.lookup_prefix(seq) if fresh else []
                n = seq.num_tokens - seq.num_computed_tokens - len(hits) * self.kv.block_size
                if n > budget and not self.chunked:
                    if not whole_batch:
                        break
                    n = 0
                n = min(n, budget)
                if not self.kv.allocate(seq, n, hits, reserve=self.kv.watermark_blocks):
                    break
                if seq.num_preemptions == 0:
                    self.kv.record_lookup(seq.num_tokens, len(hits) * self.kv.block_size)
                    seq.num_cached_tokens = len(hits) * self.kv.block_size
                self.waiting.pop(i)
                if lora is not None:
                    loras.add(lora)
                seq.status = SequenceStatus.RUNNING
                bisect.insort(self.running, seq, key=Sequence.sort_key)
                if seq.request.times.first_scheduled is None:
                    seq.request.times.first_scheduled = time.monotonic()
                if n:
                    scheduled.append((seq, n, 0))
                    budget -= n

        batch.seqs = [s for s, _, _ in scheduled]
        batch.num_new_tokens = [n for _, n, _ in scheduled]
        batch.spec_slots = [k for _, _, k in scheduled]
        batch.block_copies = self.kv.take_pending_copies()
        return batch.with_drafts([[] for _ in scheduled])  # puts decodes first

    def _draft_room(self, seq: Sequence, budget: int) -> int:
        """How many draft tokens a decoding sequence may verify this step: up to
        num_speculative_tokens, leaving room for the extra sampled token within max_tokens
        and the context; none for requests speculation cannot serve exactly."""
        if not self.num_spec or not can_speculate(seq):
            return 0
        room = min(seq.params.max_tokens - seq.num_output_tokens,
                   self.max_model_len - seq.num_tokens) - 1
        return max(0, min(self.num_spec, room, budget))

    def _admission_open(self) -> bool:
        """Continuous: always. Static/dynamic: only between batches (dynamic also waits for
        the batch to fill or for its oldest request to have waited batch_wait_ms)."""
        if self.config.batching == "continuous":
            return True
        if self.running:
            return False
        if self.config.batching == "dynamic" and self.waiting:
            full = len(self.waiting) >= self.config.max_num_seqs
            oldest = min(s.request.times.arrival for s in self.waiting)
            waited = (time.monotonic() - oldest) * 1000 >= self.config.batch_wait_ms
            return full or waited
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Free a running sequence's blocks; it goes back to waiting and is recomputed."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        self.add(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished and return its blocks to the pool."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.remove(seq)
