"""Beam search inside the engine, over shared KV blocks.

A beam-search request starts as one sequence. Every step each live beam decodes one token
in the ordinary batch (the sampler returns its 2 * beam_width most likely continuations, as
log_softmax of the raw logits) and waits. Once every live beam of the request has its
candidates, one round runs on the host:

- all candidates are ranked by cumulative logprob; a stop token (EOS, stop_token_ids) among
  the best beam_width candidates closes a finished hypothesis, the best beam_width others
  become the next beams;
- a beam chosen once is extended in place; a beam chosen k > 1 times is forked k - 1 times.
  A fork shares all of its parent's KV blocks (reference counts, no copy); the partly
  filled last block is copied on the first write into it (KVCacheManager copy-on-write),
  so beams store only what differs between them; beams not chosen are freed;
- the search ends when beam_width hypotheses are finished and none of the live beams scores
  better than the worst of them (the length-normalized heuristic of HF transformers), or
  when the beams reach max_tokens (they all become hypotheses).

Score = cumulative logprob / (generated tokens) ** length_penalty. The request returns its
best `n` hypotheses."""

from __future__ import annotations

from dataclasses import dataclass, field

from peregrine.engine.kv_cache import KVCacheManager
from peregrine.engine.logprobs import LogprobFormatter
from peregrine.engine.scheduler import Scheduler
from peregrine.engine.sequence import Request, Sequence
from peregrine.models.tokenizer import Tokenizer
from peregrine.outputs import CompletionOutput, Logprob
from peregrine.sampling.sampler import TokenLogprobs


@dataclass
class BeamHypothesis:
    """A finished beam: its output tokens and how it ranks."""

    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str
    stop_reason: int | None
    score: float


@dataclass
class BeamSearchState:
    """One request's search: finished hypotheses and the candidates gathered this round."""

    width: int
    length_penalty: float
    finished: list[BeamHypothesis] = field(default_factory=list)  # best first, <= width
    candidates: dict[int, TokenLogprobs] = field(default_factory=dict)  # seq_id -> top 2W
    next_index: int = 1  # index of the next forked beam
    done: bool = False

    def score(self, cumulative_logprob: float, length: int) -> float:
        """Length-normalized score of a beam with `length` generated tokens."""
        return cumulative_logprob / max(length, 1) ** self.length_penalty

    def add(self, hyp: BeamHypothesis) -> None:
        """Keep `hyp` if it is among the `width` best finished ones."""
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.width:]

    def is_done(self, best_live_cumulative: float, length: int) -> bool:
        """Enough hypotheses, and the best live beam does not beat the worst of them."""
        return (len(self.finished) >= self.width
                and self.finished[-1].score >= self.score(best_live_cumulative, length))


class BeamSearch:
    """Runs the rounds of every beam-search request of one engine."""

    def __init__(self, scheduler: Scheduler, kv: KVCacheManager, tokenizer: Tokenizer,
                 formatter: LogprobFormatter, max_model_len: int) -> None:
        self.scheduler = scheduler
        self.kv = kv
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.max_model_len = max_model_len

    def collect(self, seq: Sequence, candidates: TokenLogprobs) -> None:
        """Store a beam's continuations of this step until its siblings have theirs."""
        seq.request.beam.candidates[seq.seq_id] = candidates

    def advance(self, req: Request) -> None:
        """Run one round if every live beam of `req` has its candidates."""
        state: BeamSearchState = req.beam
        live = [s for s in req.seqs if not s.is_finished]
        if state.done or not live or any(s.seq_id not in state.candidates for s in live):
            return
        p = req.params
        length = live[0].num_output_tokens + 1
        ranked = []
        for seq in live:
            cand = state.candidates.pop(seq.seq_id)
            for rank, (tok, lp) in enumerate(zip(cand.top_ids, cand.top_logprobs), 1):
                step = TokenLogprobs(tok, lp, rank, cand.top_ids, cand.top_logprobs)
                ranked.append((seq.cumulative_logprob + lp, seq, step))
        ranked.sort(key=lambda c: c[0], reverse=True)

        picks: list[tuple[Sequence, TokenLogprobs]] = []
        seen = 0
        for cumulative, seq, step in ranked:
            if self._is_stop(seq, step.token_id):
                if length < p.min_tokens:
                    continue  # stop tokens are suppressed until min_tokens
                if seen < state.width:  # only a stop among the best width candidates counts
                    state.add(self._hypothesis(seq, step, cumulative, "stop", length))
            else:
                picks.append((seq, step))
                if len(picks) == state.width:
                    break
            seen += 1
        if length >= p.max_tokens or live[0].num_tokens + 1 >= self.max_model_len:
            for seq, step in picks:
                state.add(self._hypothesis(seq, step, seq.cumulative_logprob + step.logprob,
                                           "length", length))
            picks = []

        beams = self._extend(live, picks)
        if not beams or state.is_done(max(s.cumulative_logprob for s in beams), length):
            for seq in beams:
                self.scheduler.finish(seq, "stop")
            state.done = True
        req.seqs = beams or live  # finished sequences once the search is over

    def _is_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        return token in p.stop_token_ids or (not p.ignore_eos
                                             and token in seq.request.eos_token_ids)

    def _extend(self, live: list[Sequence], picks: list[tuple[Sequence, TokenLogprobs]]
                ) -> list[Sequence]:
        """The next beams: each pick extends its parent, forked when picked again; parents
        not picked are freed."""
        groups: dict[int, list[TokenLogprobs]] = {}
        for seq, step in picks:
            groups.setdefault(seq.seq_id, []).append(step)
        beams = []
        for parent in live:
            steps = groups.get(parent.seq_id)
            if not steps:
                self.scheduler.finish(parent, "stop")
                continue
            seqs = [parent] + [self._fork(parent) for _ in steps[1:]]
            for seq, step in zip(seqs, steps):
                self._append(seq, step)
            beams.extend(seqs)
        return beams

    def _fork(self, parent: Sequence) -> Sequence:
        state: BeamSearchState = parent.request.beam
        child = parent.fork(state.next_index)
        state.next_index += 1
        self.kv.fork(parent, child)
        self.scheduler.add_fork(child)
        return child

    def _append(self, seq: Sequence, step: TokenLogprobs) -> None:
        seq.token_ids.append(step.token_id)
        seq.cumulative_logprob += step.logprob
        if seq.logprobs is not None:
            seq.logprobs.append(self.formatter.entry(step, seq.params.logprobs))

    def _hypothesis(self, seq: Sequence, step: TokenLogprobs, cumulative: float, reason: str,
                    length: int) -> BeamHypothesis:
        logprobs = None
        if seq.logprobs is not None:
            logprobs = seq.logprobs + [self.formatter.entry(step, seq.params.logprobs)]
        stop_reason = step.token_id if step.token_id in seq.params.stop_token_ids else None
        return BeamHypothesis(seq.output_token_ids + [step.token_id], cumulative, logprobs,
                              reason, stop_reason, seq.request.beam.score(cumulative, length))

    def outputs(self, req: Request) -> list[CompletionOutput]:
        """The best n finished hypotheses (or, while searching, the best n live beams)."""
        state: BeamSearchState = req.beam
        p = req.params
        skip = p.skip_special_tokens
        if state.done:
            return [CompletionOutput(i, self.tokenizer.decode(h.token_ids, skip), h.token_ids,
                                     h.cumulative_logprob, h.logprobs, h.finish_reason,
                                     h.stop_reason)
                    for i, h in enumerate(state.finished[:p.n])]
        live = sorted((s for s in req.seqs if not s.is_finished),
                      key=lambda s: s.cumulative_logprob, reverse=True)
        return [CompletionOutput(i, self.tokenizer.decode(s.output_token_ids, skip),
                                 s.output_token_ids, s.cumulative_logprob,
                                 None if s.logprobs is None else list(s.logprobs))
                for i, s in enumerate(live[:p.n])]

