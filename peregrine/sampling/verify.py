"""Verification: the target's logits at every draft position -> accepted drafts + one token.

The target distribution of each position is the sampler's own (logit_bias, temperature,
min-p, top-k, top-p), so accepting by rejection sampling keeps every request's output
distributed as without speculation; greedy rows accept exactly the argmax prefix."""

from __future__ import annotations

import itertools

import torch

from peregrine.sampling.rejection import RejectionOutput, rejection_sample
from peregrine.sampling.sampler import SamplingTensors, apply_logits_processors, filtered_probs


def verify_drafts(logits: torch.Tensor, drafts: list[list[int]], st: SamplingTensors,
                  generators: list[torch.Generator | None], default: torch.Generator
                  ) -> RejectionOutput:
    """logits [R, V]: for each sequence, 1 + len(its drafts) consecutive rows (the positions
    of its last token and of each draft); `st` has one row per logits row; `generators`: a
    seeded sequence's own for its accept/reject draws."""
    dev = logits.device
    logits = apply_logits_processors(logits, st)
    one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    if st.all_greedy:
        probs = one_hot
    else:
        probs = filtered_probs(torch.softmax(logits / st.temperature.unsqueeze(1), dim=-1), st)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        probs = torch.where(st.greedy.unsqueeze(1), one_hot, probs)
    counts = [len(d) for d in drafts]
    k = max(counts)
    starts = torch.tensor(list(itertools.accumulate([0] + [1 + c for c in counts[:-1]])),
                          device=dev)
    # Row j of sequence b: its position min(j, drafts) (padding repeats the last row).
    offs = torch.arange(k + 1, device=dev)
    index = starts.unsqueeze(1) + torch.minimum(offs, torch.tensor(counts, device=dev)
                                               .unsqueeze(1))
    padded = torch.tensor([d + [-1] * (k - len(d)) for d in drafts], device=dev)
    first_rows = index[:, 0]
    return rejection_sample(probs[index], padded, torch.tensor(counts, device=dev), None,
                            st.greedy[first_rows], generators, default)
