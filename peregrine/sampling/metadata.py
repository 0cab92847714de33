"""Sampling metadata: the per-row tensors the sampler needs, built from the step's sequences.

Each optional part (filters, penalties, logit_bias, min_tokens, logprobs) is built only when
some row of the batch uses it, so a plain batch pays for none of them."""

from __future__ import annotations

import itertools
import random

import torch

from peregrine.engine.batch import ScheduledBatch
from peregrine.engine.sequence import Sequence
from peregrine.sampling.sampler import PenaltyTensors, SamplingTensors


def build_sampling_tensors(seqs: list[Sequence], vocab_size: int, device: torch.device,
                           rng: random.Random) -> SamplingTensors:
    """Per-row sampling controls of the sequences being sampled, one row each. `rng` draws
    the uniforms of rows without a seed of their own."""
    params = [s.params for s in seqs]
    V = vocab_size
    # Beam search picks among the top logprobs itself; its rows just take the argmax.
    greedy = [p.greedy or p.use_beam_search for p in params]
    sampled = [i for i, g in enumerate(greedy) if not g]
    uses_k = [i for i in sampled if params[i].top_k > 0]
    uses_p = [i for i in sampled if params[i].top_p < 1]
    filtered = bool(uses_k or uses_p)
    # With filters in the batch, greedy rows keep only their best token (cheapest), and
    # sampled rows without top-k / top-p draw from the whole distribution ("plain").
    top_k = [1 if g and filtered else V for g in greedy]
    for i in uses_k:
        top_k[i] = params[i].top_k
    plain = [filtered and not g and top_k[i] == V and params[i].top_p == 1
             for i, g in enumerate(greedy)]
    uniforms = [0.0] * len(seqs)
    for i in sampled:
        uniforms[i] = (seq_generator(seqs[i]) or rng).random()
    return SamplingTensors(
        temperature=torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                                 device=device),
        greedy=torch.tensor(greedy, device=device), all_greedy=not sampled,
        uniforms=torch.tensor(uniforms, dtype=torch.float64, device=device),
        top_k=torch.tensor(top_k, device=device) if any(k < V for k in top_k) else None,
        top_k_max=max((top_k[i] for i in uses_k), default=None),
        top_p=torch.tensor([1.0 if g else p.top_p for g, p in zip(greedy, params)],
                           device=device) if uses_p else None,
        min_p=torch.tensor([0.0 if g else p.min_p for g, p in zip(greedy, params)],
                           device=device) if any(params[i].min_p > 0 for i in sampled) else None,
        plain=torch.tensor(plain, device=device) if any(plain) else None,
        penalties=penalty_tensors(seqs, V, device),
        logit_bias=logit_bias_tensors(seqs, V, device),
        banned=min_tokens_banned(seqs, V, device),
        **logprob_rows(seqs, V, device))


def seq_generator(seq: Sequence) -> random.Random | None:
    """The sequence's own generator when its request has a seed (sample i: seed + i)."""
    seed = seq.params.seed
    if seed is None:
        return None
    if seq.generator is None:
        seq.generator = random.Random(seed + seq.index)
    return seq.generator


def spec_generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """A seeded request's own generator for accept/reject draws (sample i: seed + i)."""
    if seq.params.seed is None:
        return None
    if seq.spec_generator is None:
        seq.spec_generator = torch.Generator(device).manual_seed(seq.params.seed + seq.index)
    return seq.spec_generator


def _flat_index(rows: list[int], ids: list[torch.Tensor] | list[list[int]], V: int,
                device: torch.device) -> torch.Tensor:
    """row * V + token for every token of every row (ids given per row)."""
    offsets = torch.tensor(list(itertools.chain.from_iterable(
        [r * V] * len(t) for r, t in zip(rows, ids))), dtype=torch.long, device=device)
    if ids and isinstance(ids[0], torch.Tensor):
        flat = torch.cat(ids)
    else:
        flat = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long,
                            device=device)
    return flat + offsets


def penalty_tensors(seqs: list[Sequence], V: int, device: torch.device) -> PenaltyTensors | None:
    """Flat token indices and per-row coefficients of the rows with any penalty."""
    params = [s.params for s in seqs]
    rep = [p.repetition_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    rows = [i for i in range(len(seqs)) if rep[i] != 1 or freq[i] != 0 or pres[i] != 0]
    if not rows:
        return None
    outputs = [seqs[i].token_ids[seqs[i].num_prompt_tokens:] for i in rows]
    pt = PenaltyTensors(output_index=_flat_index(rows, outputs, V, device))
    rep_rows = [i for i in rows if rep[i] != 1]
    if rep_rows:
        pt.repetition = torch.tensor(rep, device=device)
        prompts = [seqs[i].request.prompt_ids_on(device) for i in rep_rows]
        pt.prompt_index = _flat_index(rep_rows, prompts, V, device)
    if any(f != 0 for f in freq):
        pt.frequency = torch.tensor(freq, device=device)
    if any(p != 0 for p in pres):
        pt.presence = torch.tensor(pres, device=device)
    return pt


def logit_bias_tensors(seqs: list[Sequence], V: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat indices and values of every row's logit_bias."""
    index: list[int] = []
    values: list[float] = []
    for i, seq in enumerate(seqs):
        for tok, bias in (seq.params.logit_bias or {}).items():
            index.append(i * V + tok)
            values.append(bias)
    if not index:
        return None
    return (torch.tensor(index, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


def min_tokens_banned(seqs: list[Sequence], V: int, device: torch.device) -> torch.Tensor | None:
    """Flat indices of EOS and stop tokens of the rows that have not reached min_tokens."""
    index: list[int] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            continue
        eos = [] if p.ignore_eos else seq.request.eos_token_ids
        index.extend(i * V + t for t in set(eos) | set(p.stop_token_ids) if t < V)
    return torch.tensor(index, device=device) if index else None


def logprob_rows(seqs: list[Sequence], V: int, device: torch.device) -> dict:
    """Rows whose sampled token needs its logprob, and how many top logprobs each returns
    (beam search needs the best 2 * beam_width continuations of each beam)."""
    rows, nums = [], []
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.needs_sampled_logprobs:
            continue
        n = p.logprobs or 0
        if p.use_beam_search:
            n = max(n, 2 * p.beam_width)
        rows.append(i)
        nums.append(min(n, V))
    if not rows:
        return {}
    return dict(logprob_rows=torch.tensor(rows, device=device), num_logprobs=nums)


def prompt_logprob_positions(batch: ScheduledBatch) -> list[tuple[Sequence, int, int, int]]:
    """(seq, first flat row, first position, count) of the prompt positions of this step
    whose next-token logprobs are still wanted (position p gives prompt token p + 1's)."""
    out = []
    flat = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if seq.collects_prompt_logprobs:
            start = seq.num_computed_tokens
            first = max(start, len(seq.request.prompt_logprobs) - 1)
            end = min(start + n, seq.num_prompt_tokens - 1)
            if end > first:
                out.append((seq, flat + first - start, first, end - first))
        flat += n
    return out
