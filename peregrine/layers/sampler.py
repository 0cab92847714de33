"""The sampler: last-position logits of every sequence -> next tokens, vectorized over the batch.

Sampling uses the exponential race: with E_i ~ Exp(1) i.i.d., argmax_i p_i / E_i is a draw
from p. The noise for a seeded request comes from that request's own generator, so its
tokens depend on its seed and step only, never on what else is in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingTensors:
    """Per-row sampling controls of one batch, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float; 1.0 on greedy rows (unused there)
    top_k: torch.Tensor | None  # [B] int64, vocab size where disabled; None: no row uses it
    top_p: torch.Tensor | None  # [B] float; None: no row uses it
    min_p: torch.Tensor | None  # [B] float; None: no row uses it
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    generators: list[torch.Generator | None]  # per row; None: the shared generator


@dataclass
class SamplerOutput:
    """Sampled token ids [B] (on the host) and, when asked, their logprobs."""

    token_ids: list[int]
    logprobs: torch.Tensor | None = None  # [B, V] log_softmax of the raw logits, when needed


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                            top_p: torch.Tensor | None, min_p: torch.Tensor | None
                            ) -> torch.Tensor:
    """Set to -inf the logits each row's top-k / top-p / min-p filters remove."""
    if min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        remove |= ranks.unsqueeze(0) >= top_k.unsqueeze(1)
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        # Keep a token while the mass strictly before it is below top_p (the first always).
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= top_p.unsqueeze(1)
    return logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))


def random_sample(probs: torch.Tensor, generators: list[torch.Generator | None],
                  default: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of `probs` [B, V] by the exponential race."""
    noise = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        noise.exponential_(generator=default)
    else:
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        if shared:
            idx = torch.tensor(shared, device=probs.device)
            noise[idx] = torch.empty((len(shared), probs.shape[1]), device=probs.device,
                                     dtype=probs.dtype).exponential_(generator=default)
    return (probs / noise).argmax(dim=-1)


class Sampler(nn.Module):
    """Logits [B, V] -> token ids [B]; greedy rows take the argmax."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, logits: torch.Tensor, st: SamplingTensors,
                need_logprobs: bool = False) -> SamplerOutput:
        logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None
        if st.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            scaled = logits / st.temperature.unsqueeze(1)
            scaled = apply_top_k_top_p_min_p(scaled, st.top_k, st.top_p, st.min_p)
            probs = torch.softmax(scaled, dim=-1)
            tokens = random_sample(probs, st.generators, self.generator)
            tokens = torch.where(st.greedy, logits.argmax(dim=-1), tokens)
        return SamplerOutput(tokens.tolist(), logprobs)
