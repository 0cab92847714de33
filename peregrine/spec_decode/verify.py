"""Verification: the target's logits at every draft position -> accepted drafts + one token.

The target distribution of each position is the sampler's own (logit_bias, temperature,
min-p, top-k, top-p), so accepting by rejection sampling keeps every request's output
distributed as without speculation; greedy rows accept exactly the argmax prefix."""

from __future__ import annotations

import itertools

import torch

from peregrine.engine.sequence import Sequence
from peregrine.layers.sampler import SamplingTensors, apply_logits_processors, filtered_probs
from peregrine.spec_decode.rejection import RejectionOutput, rejection_sample


def verify_drafts(logits: torch.Tensor, seqs: list[Sequence], st: SamplingTensors,
                  default: torch.Generator) -> RejectionOutput:
    """logits [R, V]: for each sequence, 1 + len(seq.spec_token_ids) consecutive rows (the
    positions of its last token and of each draft); `st` has one row per logits row."""
    dev = logits.device
    logits = apply_logits_processors(logits, st)
    one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    if st.all_greedy:
        probs = one_hot
    else:
        probs = filtered_probs(torch.softmax(logits / st.temperature.unsqueeze(1), dim=-1), st)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        probs = torch.where(st.greedy.unsqueeze(1), one_hot, probs)
    counts = [len(s.spec_token_ids) for s in seqs]
    k = max(counts)
    starts = torch.tensor(list(itertools.accumulate([0] + [1 + c for c in counts[:-1]])),
                          device=dev)
    # Row j of sequence b: its position min(j, drafts) (padding repeats the last row).
    offs = torch.arange(k + 1, device=dev)
    index = starts.unsqueeze(1) + torch.minimum(offs, torch.tensor(counts, device=dev)
                                               .unsqueeze(1))
    drafts = torch.tensor([s.spec_token_ids + [-1] * (k - len(s.spec_token_ids)) for s in seqs],
                          device=dev)
    first_rows = index[:, 0]
    return rejection_sample(probs[index], drafts, torch.tensor(counts, device=dev), None,
                            st.greedy[first_rows], [spec_generator(s, dev) for s in seqs], default)


def spec_generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """A seeded request's own generator for accept/reject draws (sample i: seed + i)."""
    if seq.params.seed is None:
        return None
    if seq.spec_generator is None:
        seq.spec_generator = torch.Generator(device).manual_seed(seq.params.seed + seq.index)
    return seq.spec_generator
