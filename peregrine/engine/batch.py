"""The step contract: the scheduler's batch is all the runner and postprocess see (read only)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from peregrine.attention_backend import AttentionMetadata
from peregrine.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    """This step's work: sequences (single-token ones first) and tokens to compute of each."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # drafts included
    num_decodes: int = 0  # leading entries with exactly one new token
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    spec_slots: list[int] = field(default_factory=list)  # KV slots reserved for draft tokens
    drafts: list[list[int]] = field(default_factory=list)  # draft tokens verified, per entry

    def with_drafts(self, drafts: list[list[int]]) -> "ScheduledBatch":
        """A copy with each entry's drafts counted among its new tokens, and the single-token
        entries first (the attention backend runs them as one batch)."""
        entries = sorted(zip(self.seqs, self.num_new_tokens, self.spec_slots, drafts),
                         key=lambda e: e[1] + len(e[3]) != 1)
        num_new = [n + len(d) for _, n, _, d in entries]
        return replace(self, seqs=[e[0] for e in entries], num_new_tokens=num_new,
                       num_decodes=sum(1 for n in num_new if n == 1),
                       spec_slots=[e[2] for e in entries], drafts=[e[3] for e in entries])

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether entry i reaches its last token this step (so a token is sampled for it)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] >= seq.num_tokens


@dataclass
class ModelInput:
    """The flat batch of one step, ready for the model."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to sample from
    sample_rows: list[int]  # batch entries that sample (1 + their drafts rows each)
    lora_slots: torch.Tensor | None = None  # [T] adapter slot per token, -1: base (LoRA on)
