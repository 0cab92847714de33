"""Exact rejection sampling for speculative decoding, vectorized over the batch.

Draft token x_j (proposed with probability q_j(x_j)) is accepted with probability
min(1, p_j(x_j) / q_j(x_j)), where p_j is the target's distribution at that position. At the
first rejection the output token is drawn from normalize(max(0, p_j - q_j)); if every draft
is accepted, one bonus token is drawn from p_k. The output is then distributed exactly as
the target's own samples (Leviathan et al., 2023). Greedy rows accept a draft iff it is the
target's argmax, which reproduces greedy decoding token for token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peregrine.sampling.sampler import random_sample


@dataclass
class RejectionOutput:
    """Tokens to append per row: the accepted drafts, then one corrected or bonus token."""

    tokens: list[list[int]]
    num_accepted: list[int]  # accepted draft tokens per row (the extra token not counted)


def rejection_sample(target_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     num_drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                     greedy: torch.Tensor, generators: list[torch.Generator | None],
                     default: torch.Generator | None = None) -> RejectionOutput:
    """target_probs [B, K+1, V]; draft_tokens [B, K] (entries past num_drafts [B] ignored);
    draft_probs [B, K, V], or None for a deterministic proposer (q one-hot at the draft);
    greedy [B] bool. A row's randomness comes from its own generator when it has one."""
    b, kp1, v = target_probs.shape
    k = kp1 - 1
    dev = target_probs.device
    rows = torch.arange(b, device=dev)
    argmax = target_probs.argmax(dim=2)  # [B, K+1]
    if k:
        drafts = draft_tokens.clamp(min=0)
        p_draft = target_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)  # [B, K]
        q_draft = (torch.ones_like(p_draft) if draft_probs is None
                   else draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2))
        accept = uniform(generators, default, b, k, dev) * q_draft < p_draft  # u < p / q
        accept = torch.where(greedy.unsqueeze(1), argmax[:, :k] == draft_tokens, accept)
        accept &= torch.arange(k, device=dev).unsqueeze(0) < num_drafts.unsqueeze(1)
        num_accepted = torch.cumprod(accept.int(), dim=1).sum(dim=1)  # first rejection
    else:
        num_accepted = torch.zeros(b, dtype=torch.long, device=dev)
    p_next = target_probs[rows, num_accepted]  # [B, V]: where the extra token is drawn
    rejected = num_accepted < num_drafts
    if k and bool(rejected.any()):
        at = num_accepted.clamp(max=k - 1)
        if draft_probs is None:
            q_next = torch.zeros_like(p_next)
            q_next[rows, draft_tokens[rows, at].clamp(min=0)] = 1.0
        else:
            q_next = draft_probs[rows, at]
        residual = (p_next - q_next).clamp(min=0)
        mass = residual.sum(dim=1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
        p_next = torch.where(rejected.unsqueeze(1), residual, p_next)
    extra = random_sample(p_next, generators, default)
    extra = torch.where(greedy, argmax[rows, num_accepted], extra)
    drafts_host, acc_host, extra_host = draft_tokens.tolist(), num_accepted.tolist(), extra.tolist()
    tokens = [drafts_host[i][:acc_host[i]] + [extra_host[i]] for i in range(b)]
    return RejectionOutput(tokens, acc_host)


def uniform(generators: list[torch.Generator | None], default: torch.Generator | None,
            rows: int, k: int, device: torch.device) -> torch.Tensor:
    """U(0, 1) draws [rows, k]; seeded rows draw from their own generator."""
    out = torch.rand((rows, k), device=device, generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.rand(k, device=device, generator=g)
    return out
