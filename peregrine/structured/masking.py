"""Token bitmasks of constrained sequences: filled from their matchers, applied to the logits.

Each step, the sampled sequences that carry a grammar matcher get one row of a single int32
bitmask [B, ceil(V / 32)] (bit set = token allowed), filled in one batched xgrammar call and
applied in place to the step's logits before the sampler. A batch without constrained
sequences allocates and fills nothing."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

# xgrammar's own kernel covers these; other dtypes (float64 test models) use the torch path.
_XGR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fill_bitmasks(bitmask: torch.Tensor, row0: int, matcher: Any,
                  lookahead: Seq[int] = ()) -> int:
    """Fill row `row0` with the matcher's next-token mask and, for draft tokens d1..dk in
    `lookahead`, row `row0 + j` with the mask after accepting d1..dj (speculative decoding
    verifies k + 1 positions of one sequence at once). Returns how many leading drafts the
    grammar accepts: rows past `row0 + accepted` are left as they were. The matcher ends in
    the state it started in (it needs max_rollback_tokens >= len(lookahead))."""
    matcher.fill_next_token_bitmask(bitmask, row0)
    accepted = 0
    for token in lookahead:
        if matcher.is_terminated() or not matcher.accept_token(token):
            break
        accepted += 1
        if matcher.is_terminated():  # a stop token: nothing follows, the next row is unused
            break
        matcher.fill_next_token_bitmask(bitmask, row0 + accepted)
    if accepted:
        matcher.rollback(accepted)
    return accepted


def grammar_prefix(matcher: Any, tokens: Seq[int]) -> int:
    """How many leading `tokens` the grammar accepts from the matcher's state (which is
    left unchanged)."""
    accepted = 0
    for token in tokens:
        if matcher.is_terminated() or not matcher.accept_token(token):
            break
        accepted += 1
    if accepted:
        matcher.rollback(accepted)
    return accepted


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of `rows` whose bit in `bitmask` is clear."""
    bitmask = bitmask.to(logits.device, non_blocking=True)
    if logits.dtype in _XGR_DTYPES:
        import xgrammar as xgr
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
        return
    V = logits.shape[1]
    index = torch.tensor(rows, device=logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[index].unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :V]
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


@dataclass
class MaskTimes:
    """Seconds spent on masks over all steps with a constrained row (benchmarks read it)."""

    steps: int = 0
    fill_s: float = 0.0
    apply_s: float = 0.0


class StepMasks:
    """The filled bitmask of one step, to apply to its logits."""

    def __init__(self, bitmask: torch.Tensor, rows: list[int], times: MaskTimes) -> None:
        self.bitmask = bitmask
        self.rows = rows  # batch rows with a matcher
        self._times = times

    def apply_(self, logits: torch.Tensor) -> None:
        """Mask the constrained rows of `logits` [B, V] in place."""
        t0 = time.perf_counter()
        apply_bitmask_(logits, self.bitmask, self.rows)
        self._times.apply_s += time.perf_counter() - t0


class GrammarMasker:
    """Fills each step's bitmask for the sequences being sampled.

    The fill runs on the step's thread, before the forward pass. Filling in a worker thread
    during the forward pass was measured on the 2-core CPU host and lost throughput (the
    fill competes with the forward for the cores; see docs/structured_outputs.md)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._batch_matcher: Any = None
        self.times = MaskTimes()

    def start(self, matchers: Seq[Any], drafts: Seq[Seq[int]]) -> StepMasks | None:
        """Fill the masks of the sampled sequences' matchers (None: unconstrained): a row
        each, plus one per draft token (rows in order); None when none is constrained."""
        constrained = [i for i, m in enumerate(matchers) if m is not None]
        if not constrained:
            return None
        import xgrammar as xgr
        if self._batch_matcher is None:
            # One C++ call fills every row; a single thread: the forward pass owns the cores.
            self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=1)
        t0 = time.perf_counter()
        first = list(itertools.accumulate((1 + len(d) for d in drafts), initial=0))
        bitmask = xgr.allocate_token_bitmask(first[-1], self.vocab_size)
        single = [i for i in constrained if not drafts[i]]
        if single:
            self._batch_matcher.batch_fill_next_token_bitmask(
                [matchers[i] for i in single], bitmask, [first[i] for i in single])
        rows = [first[i] for i in single]
        for i in constrained:
            if drafts[i]:  # the drafts were cut to what the grammar accepts
                fill_bitmasks(bitmask, first[i], matchers[i], drafts[i])
                rows += range(first[i], first[i] + 1 + len(drafts[i]))
        self.times.steps += 1
        self.times.fill_s += time.perf_counter() - t0
        return StepMasks(bitmask, sorted(rows), self.times)
